"""Models trained elsewhere, imported with their data, analysed by every pipeline (float64)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits
from torch import nn

from curvlake.cli import cli
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.pipelines.data import import_dataset
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.npeff.compute_pefs import run_pefs
from curvlake.pipelines.runs import import_run


def _train_elsewhere(x: np.ndarray, y: np.ndarray) -> nn.Sequential:
    """A float64 MLP trained by a plain torch loop, as another code base would."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    digits = load_digits()
    x, y = (digits.data[:300] / 16.0), digits.target[:300]
    np.savez(tmp / "data.npz", x=x, y=y)
    net = _train_elsewhere(x, y)
    torch.save(net.state_dict(), tmp / "weights.pt")
    lake = open_lake(tmp / "lake", create=True)
    dataset_id = import_dataset(lake, tmp / "data.npz")
    run_id = import_run(
        lake,
        tmp / "weights.pt",
        model="mlp",
        model_params={"widths": [12], "activation": "tanh"},
        key_map="order",
        dataset=dataset_id,
    )
    return lake, run_id, net, tmp


def test_imported_run_keeps_float64_and_tabular_shape(imported):
    lake, run_id, net, _ = imported
    ds = lake.open(run_id)
    assert ds.theta.dtype == np.float64
    assert ds.attrs["input_shape"] == [64]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    np.testing.assert_array_equal(ds.theta[0].values, theta)
    model = load_model(lake, run_id)
    assert next(model.parameters()).dtype == torch.float64
    config = lake.info(run_id).config
    assert config["standardize"] == "none" and config["weights_sha256"]


def _test_inputs(lake, run_id, n):
    from curvlake.pipelines.train import cached_run_splits

    split = cached_run_splits(lake.url, run_id).split("train")
    return torch.as_tensor(split.x[:n], dtype=torch.float64)


def test_dpefs_of_an_imported_float64_model_equal_an_autograd_loop(imported):
    lake, run_id, net, _ = imported
    n = 12
    pefs_id = run_pefs(
        lake,
        run_id,
        n_examples=n,
        storage="dense",
        dtype="float64",
        block_size=5,
        progress=False,
    )
    stored = lake.open(pefs_id)["dense"].values
    assert stored.dtype == np.float64
    x = _test_inputs(lake, run_id, n)
    params = list(net.parameters())
    for i in range(n):
        log_p = torch.log_softmax(net(x[i : i + 1])[0], dim=0)
        expected = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for c in range(10):
            grads = torch.autograd.grad(log_p[c], params, retain_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            expected += log_p[c].exp().detach() * flat**2
        np.testing.assert_allclose(stored[i], expected.numpy(), rtol=1e-12, atol=1e-14)


def test_jacobian_norms_of_an_imported_float64_model_equal_autograd(imported):
    lake, run_id, net, _ = imported
    stats_id = run_stats(
        lake,
        [run_id],
        metrics=["jacobian_operator", "jacobian_frobenius"],
        dtype="float64",
        block_size=7,
        progress=False,
    )
    ds = lake.open(stats_id)
    n = ds.sizes["example"]
    x = _test_inputs(lake, run_id, n)
    for i in range(0, n, 37):
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x[i])
        sigma = torch.linalg.matrix_norm(jac, ord=2).item()
        frob = torch.linalg.matrix_norm(jac).item()
        assert ds.jacobian_operator.values[0, 0, i] == pytest.approx(sigma, rel=1e-12)
        assert ds.jacobian_frobenius.values[0, 0, i] == pytest.approx(frob, rel=1e-12)


def test_a_plain_module_with_its_state_dict(imported):
    lake, run_id, _, tmp = imported
    torch.jit.script(nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()).save(
        tmp / "module.pt"
    )
    dataset_id = lake.info(run_id).config["dataset"]
    other = import_run(lake, tmp / "weights.pt", module=tmp / "module.pt", dataset=dataset_id)
    np.testing.assert_array_equal(lake.open(other).theta.values, lake.open(run_id).theta.values)


def test_import_errors_are_clear(imported):
    lake, run_id, _, tmp = imported
    dataset_id = lake.info(run_id).config["dataset"]
    with pytest.raises(UserInputError, match="try --key-map order"):
        import_run(
            lake,
            tmp / "weights.pt",
            model="mlp",
            model_params={"widths": [12], "activation": "tanh"},
            dataset=dataset_id,
        )
    with pytest.raises(UserInputError, match="does not fit"):
        import_run(
            lake,
            tmp / "weights.pt",
            model="mlp",
            model_params={"widths": [13]},
            key_map="order",
            dataset=dataset_id,
        )
    (tmp / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserInputError, match="neither TorchScript nor a pickled"):
        import_run(lake, tmp / "garbage.pt", dataset=dataset_id)


def test_a_run_without_data_is_refused_with_how_to_attach_it(imported):
    lake, _, _, tmp = imported
    weights_only = import_run(
        lake,
        tmp / "weights.pt",
        model="mlp",
        model_params={"widths": [12], "activation": "tanh"},
        key_map="order",
        num_classes=10,
        input_shape=[64],
    )
    for compute in (
        lambda: run_pefs(lake, weights_only, progress=False),
        lambda: run_stats(lake, [weights_only], progress=False),
    ):
        with pytest.raises(UserInputError, match="--dataset dataset-<id>"):
            compute()


def test_cli_import_then_analyse(imported):
    lake, run_id, _, tmp = imported
    dataset_id = lake.info(run_id).config["dataset"]
    runner = CliRunner()
    base = ["--lake", lake.url, "--cluster", "sync"]
    result = runner.invoke(
        cli,
        [
            *base,
            "runs",
            "import",
            str(tmp / "weights.pt"),
            "--model",
            "mlp",
            "--param",
            "widths=[12]",
            "--param",
            "activation=tanh",
            "--key-map",
            "order",
            "--dataset",
            dataset_id,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == run_id
    result = runner.invoke(
        cli,
        [*base, "pefs", "compute", "--run", run_id, "--n-examples", "8", "--dtype", "float64"],
    )
    assert result.exit_code == 0, result.output
