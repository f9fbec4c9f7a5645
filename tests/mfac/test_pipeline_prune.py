"""Pruning (``run_prune_oneshot`` / ``run_prune_gradual``): OBS steps against dense float64
oracles, masks that stay zero, M-FAC >= magnitude on a trained MLP, resume, bad input, CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.nn.params import assign_parameters
from curvlake.pipelines.masks import load_mask
from curvlake.pipelines.mfac import prune as prune_module
from curvlake.pipelines.mfac.grads import batch_positions
from curvlake.pipelines.mfac.plot import plot_pruning, pruning_table
from curvlake.pipelines.mfac.prune import (
    quickstart_pruning,
    run_prune_gradual,
    run_prune_oneshot,
    selected_tensors,
)
from curvlake.pipelines.train import cached_run_splits, run_train
from tests.mfac.cases import block_diagonal_inverse, dense_inverse
from tests.pipelines.contract import _staging_state

TRAINED = {
    "model": "mlp",
    "model_params": {"widths": [32]},
    "epochs": 3,
    "lr": 0.1,
    "batch_size": 32,
    "device": "cpu",
}
FAST = {"n_grads": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("prune") / "lake", create=True)
    return lake, run_train(lake, TRAINED, progress=False)


@pytest.fixture(scope="module")
def oneshot(trained):
    lake, run_id = trained
    return run_prune_oneshot(lake, run_id, sparsities=(0.5, 0.7, 0.9), progress=False, **FAST)


def _selected(lake, run_id) -> np.ndarray:
    table = lake.open(run_id)
    sizes, offsets = table["layer_size"].values, table["layer_offset"].values
    shapes = [str(s) for s in table["layer_shape"].values]
    return np.concatenate(
        [np.arange(o, o + n) for o, n, s in zip(offsets, sizes, shapes, strict=True) if "," in s]
    )


def test_mfac_is_at_least_as_accurate_as_magnitude_at_every_level(trained, oneshot):
    lake, _ = trained
    table = pruning_table(lake, oneshot)
    assert table["dense_accuracy"] > 0.9
    for row in table["rows"]:
        assert row["accuracy"] >= row["baseline_accuracy"], row
    ninety = table["rows"][-1]
    assert ninety["accuracy"] > ninety["baseline_accuracy"] + 0.05


def test_pruned_weights_are_zero_and_masks_say_which(trained, oneshot):
    lake, run_id = trained
    ds, run = lake.open(oneshot), lake.open(run_id)
    theta0 = run["theta"].values[-1]
    selected = _selected(lake, run_id)
    others = np.setdiff1d(np.arange(theta0.size), selected)
    for role in ("", "baseline_"):
        for level, sparsity in enumerate(ds["sparsity"].values):
            theta = ds[role + "theta"].values[level]
            kept = load_mask(lake, str(ds[role + "mask"].values[level])).to_bool()
            pruned = np.flatnonzero(~kept)
            assert pruned.size == round(sparsity * selected.size)
            assert np.isin(pruned, selected).all()
            assert (theta[pruned] == 0).all()
            assert (theta[kept] != 0).all()
            np.testing.assert_array_equal(theta[others], theta0[others])  # biases untouched
            assert ds[role + "layer_pruned"].values[level].sum() == pruned.size
    baseline = ds["baseline_theta"].values[0]
    kept = load_mask(lake, str(ds["baseline_mask"].values[0])).to_bool()
    np.testing.assert_array_equal(baseline[kept], theta0[kept])  # magnitude: no update
    lake.validate(oneshot)


def test_default_selection_is_the_tensors_of_two_or_more_dimensions(trained):
    lake, run_id = trained
    from curvlake.pipelines.skeleton import resolve_run

    table = resolve_run(lake, run_id).layer_table()
    assert [table.names[i] for i in selected_tensors(table, None)] == ["fc1.weight", "fc2.weight"]
    assert [table.names[i] for i in selected_tensors(table, r"fc2")] == ["fc2.weight", "fc2.bias"]


def _dense_obs(weights, inverse, count, update):
    """One dense OBS step: the ``count`` lowest w²/(2[F⁻¹]_qq) and the update."""
    diagonal = np.diag(inverse)
    removed = np.sort(np.argsort(weights**2 / (2 * diagonal), kind="stable")[:count])
    if update == "summed":
        rhs = np.zeros_like(weights)
        rhs[removed] = weights[removed] / diagonal[removed]
        new = weights - inverse @ rhs
    else:
        block = inverse[np.ix_(removed, removed)]
        new = weights - inverse[:, removed] @ np.linalg.solve(block, weights[removed])
    new[removed] = 0.0
    return new, removed


def _autograd_window(lake, run_id, theta, columns, start, n_grads, batch_size):
    model = load_model(lake, run_id).double()
    assign_parameters(model, theta)
    data = cached_run_splits(lake.url, run_id).train
    rows = []
    for batch in batch_positions(len(data), n_grads, batch_size, "shuffled", 0, start=start):
        model.zero_grad()
        x = torch.as_tensor(data.x[batch], dtype=torch.float64)
        torch.nn.functional.cross_entropy(model(x), torch.as_tensor(data.y[batch])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()[columns])
    return np.array(rows)


@pytest.mark.parametrize(
    ("update", "block_size", "recompute"),
    [("summed", None, 1), ("group", None, 1), ("summed", 37, 1), ("summed", None, 2)],
)
def test_pruned_weights_match_dense_obs(trained, update, block_size, recompute):
    lake, run_id = trained
    m, b, damp, sparsity = 24, 2, 1e-4, 0.1
    pruning = run_prune_oneshot(
        lake, run_id, sparsities=[sparsity], layers=r"fc2\.weight", n_grads=m, batch_size=b,
        damp=damp, update=update, block_size=block_size, recompute=recompute, dtype="float64",
        progress=False,
    )  # fmt: skip
    theta = lake.open(run_id)["theta"].values[-1].astype(np.float64)
    ds = lake.open(run_id)
    start = int(ds["layer_offset"].values[2])
    selected = np.arange(start, start + int(ds["layer_size"].values[2]))
    alive = selected
    densities = [(1 - sparsity) ** ((j + 1) / recompute) for j in range(recompute)]
    densities[-1] = 1 - sparsity
    for step, density in enumerate(densities):
        window = _autograd_window(lake, run_id, theta, alive, step * m, m, b)
        inverse = (
            dense_inverse(window, damp)
            if block_size is None
            else block_diagonal_inverse(window, damp, block_size)
        )
        count = alive.size - round(density * selected.size)
        new, removed = _dense_obs(theta[alive], inverse, count, update)
        theta[alive] = new
        alive = np.delete(alive, removed)
    got = lake.open(pruning)["theta"].values[0]
    np.testing.assert_allclose(got, theta.astype(np.float32), rtol=2e-5, atol=1e-6)
    assert (got[np.setdiff1d(selected, alive)] == 0).all()


def test_layer_scope_and_layer_patterns(trained):
    lake, run_id = trained
    pruning = run_prune_oneshot(
        lake, run_id, sparsities=[0.6], scope="layer", layers=r"fc\d.weight", progress=False,
        **FAST,
    )  # fmt: skip
    ds = lake.open(pruning)
    sizes = ds["layer_size"].values
    np.testing.assert_array_equal(ds["selected"].values, [True, False, True, False])
    expected = [round(0.6 * sizes[0]), 0, round(0.6 * sizes[2]), 0]
    np.testing.assert_array_equal(ds["layer_pruned"].values[0], expected)
    np.testing.assert_array_equal(ds["baseline_layer_pruned"].values[0], expected)


def test_magnitude_method_alone(trained):
    lake, run_id = trained
    pruning = run_prune_oneshot(
        lake, run_id, sparsities=[0.5, 0.9], method="magnitude", progress=False
    )
    ds = lake.open(pruning)
    assert "baseline_theta" not in ds and ds.attrs["grad_window"] is None
    assert ds["test_accuracy"].values[0] > ds["test_accuracy"].values[1]


def test_bad_input_is_refused_before_anything_is_staged(trained):
    lake, run_id = trained
    cases = [
        ({"method": "random"}, r"method='random' is not valid: must be one of mfac, magnitude"),
        ({"sparsities": [0.5, 1.2]}, r"sparsities=\[0.5, 1.2\] is not valid"),
        ({"sparsities": []}, r"sparsities=\[\] is not valid"),
        ({"method": "magnitude", "recompute": 2}, r"recompute does not apply to method='magn"),
        ({"method": "magnitude", "block_size": 8}, r"block_size does not apply to method='magn"),
        ({"n_grads": 0}, r"n_grads=0 is not valid: must be None or an int >= 1"),
        ({"batch_size": 5000}, r"batch_size=5000 is not valid.*examples"),
        ({"damp": 0.0}, r"damp=0.0 is not valid"),
        ({"layers": "conv"}, r"layer pattern 'conv' matches none of"),
        ({"update": "group", "sparsities": [0.9]}, r"update='group' would solve for \d+ weights"),
        ({"order": "sequential", "n_grads": 2000}, r"in sequential order"),
        ({"order": "sequential", "seed": 1}, r"seed does not apply to order='sequential'"),
        ({"checkpoint": 5}, r"checkpoint=5 is not valid"),
        ({"scope": "tensor"}, r"scope='tensor' is not valid"),
    ]
    before = (_staging_state(lake), [i.id for i in lake.list()])
    for options, message in cases:
        with pytest.raises(UserInputError, match=message) as raised:
            run_prune_oneshot(lake, run_id, progress=False, **options)
        assert "\n" not in str(raised.value)
        assert (_staging_state(lake), [i.id for i in lake.list()]) == before, options
    with pytest.raises(UserInputError, match="increasing sparsities"):
        run_prune_gradual(lake, run_id, sparsities=[0.7, 0.5], progress=False)


class _Killed(Exception):
    pass


def _interrupted_then_resumed(monkeypatch, run, at_level: int):
    """Run until ``at_level`` is about to be recorded, then resume; count the OBS steps."""
    real_record, real_step = prune_module._level_record, prune_module._Pruner.obs_step
    steps: list[int] = []

    def killed(plan, chain, level, role, config):
        if level == at_level:
            raise _Killed
        return real_record(plan, chain, level, role, config)

    def counted(self, *args):
        steps.append(1)
        return real_step(self, *args)

    monkeypatch.setattr(prune_module, "_level_record", killed)
    with pytest.raises(_Killed):
        run()
    monkeypatch.setattr(prune_module, "_level_record", real_record)
    monkeypatch.setattr(prune_module._Pruner, "obs_step", counted)
    return run(), len(steps)


def test_killed_oneshot_resumes_only_the_levels_not_done(trained, oneshot, monkeypatch):
    lake, run_id = trained

    def run(sparsities=(0.6, 0.9)):
        return run_prune_oneshot(lake, run_id, sparsities=sparsities, progress=False, **FAST)

    resumed, steps = _interrupted_then_resumed(monkeypatch, run, at_level=1)
    assert steps == 1  # level 0 was done
    got, reference = lake.open(resumed), lake.open(oneshot)
    # levels are independent: level 1 (90 %) is level 2 of the three-level run
    for name in ("theta", "baseline_theta", "test_accuracy", "layer_pruned"):
        np.testing.assert_array_equal(got[name].values[1], reference[name].values[2])
    single = lake.open(run(sparsities=(0.6,)))
    np.testing.assert_array_equal(got["theta"].values[0], single["theta"].values[0])


GRADUAL = {"sparsities": (0.5, 0.8), "finetune_epochs": 1, "progress": False, **FAST}


@pytest.fixture(scope="module")
def gradual(trained):
    lake, run_id = trained
    return run_prune_gradual(lake, run_id, **GRADUAL)


def test_gradual_keeps_masks_through_fine_tuning(trained, gradual):
    lake0, _ = trained
    ds = lake0.open(gradual)
    previous = None
    for role in ("", "baseline_"):
        for level in range(2):
            kept = load_mask(lake0, str(ds[role + "mask"].values[level])).to_bool()
            assert (ds[role + "theta"].values[level][~kept] == 0).all()
            if previous is not None and role == "":
                assert not (kept & ~previous).any()  # pruned weights stay pruned
            previous = kept
    table = pruning_table(lake0, gradual)
    assert all(row["accuracy"] >= row["pruned_accuracy"] - 0.02 for row in table["rows"])
    assert table["rows"][-1]["accuracy"] > table["rows"][-1]["pruned_accuracy"]


@pytest.mark.slow
def test_killed_gradual_resumes_from_the_last_level(trained, gradual, tmp_path, monkeypatch):
    lake0, run_id = trained
    ds = lake0.open(gradual)
    lake = open_lake(tmp_path / "lake", create=True)
    assert run_train(lake, TRAINED, progress=False) == run_id
    resumed, steps = _interrupted_then_resumed(
        monkeypatch, lambda: run_prune_gradual(lake, run_id, **GRADUAL), at_level=1
    )
    assert resumed == gradual and steps == 1
    for name in ("theta", "baseline_theta", "test_loss", "pruned_test_loss"):
        np.testing.assert_array_equal(lake.open(resumed)[name].values, ds[name].values)


def test_plot_draws_accuracy_against_sparsity(trained, oneshot, gradual, tmp_path):
    lake, _ = trained
    for pruning in (oneshot, gradual):
        path = plot_pruning(lake, pruning, tmp_path / f"{pruning}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserInputError, match=r"must end in \.png"):
        plot_pruning(lake, oneshot, tmp_path / "curve.txt")


@pytest.mark.slow
def test_quickstart_pruning_returns_its_artifacts_and_figure(trained):
    lake, run_id = trained
    roles = quickstart_pruning(lake, run_id, echo=lambda _: None)
    assert roles["pruning"].startswith("pruning-")
    assert roles["grad_window"].startswith("grad_window-")
    figure = next(v for k, v in roles.items() if k.startswith("figure"))
    assert open(figure, "rb").read(4) == b"\x89PNG"


@pytest.fixture(scope="module")
def runner():
    from curvlake._cli.mfac import mfac
    from curvlake._cli.prune import prune

    for group in (mfac, prune):  # the lead registers them in curvlake/cli.py
        if group.name not in cli.commands:
            cli.add_command(group)
    return CliRunner()


def test_cli_prune_and_grads(trained, oneshot, runner, tmp_path):
    lake, run_id = trained
    base = ["--lake", lake.url, "--cluster", "sync"]
    args = ["prune", "oneshot", "--run", run_id, "--sparsity", "0.5,0.7,0.9"]
    result = runner.invoke(cli, [*base, *args, "--n-grads", "64", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert f"{oneshot}  oneshot M-FAC" in result.output and "MAGNITUDE ACC" in result.output
    result = runner.invoke(cli, [*base, *args, "--method", "magnitude", "--recompute", "2"])
    assert result.exit_code == 1 and "recompute does not apply" in result.output
    assert "Traceback" not in result.output
    gradual = ["prune", "gradual", "--run", run_id, "--method", "magnitude", "--sparsity", "0.5"]
    result = runner.invoke(cli, [*base, *gradual, "--finetune-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "gradual magnitude" in result.output and "BEFORE FINE-TUNE" in result.output
    plot = ["prune", "plot", oneshot, "--out", str(tmp_path / "p.png")]
    result = runner.invoke(cli, [*base, *plot])
    assert result.exit_code == 0 and (tmp_path / "p.png").exists()
    args = ["mfac", "grads", "--run", run_id, "--n-grads", "8", "--data", "test"]
    result = runner.invoke(cli, [*base, *args, "--order", "shuffled", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"grad_window-[0-9a-f]{16}  8 gradients of 1 example", result.output)
    result = runner.invoke(cli, [*base, *args, "--seed", "2"])
    assert result.exit_code == 1 and "seed does not apply to order='sequential'" in result.output
    result = runner.invoke(cli, [*base, *args[:-4], "--n-grads", "0"])
    assert result.exit_code == 1 and "n_grads=0 is not valid" in result.output
