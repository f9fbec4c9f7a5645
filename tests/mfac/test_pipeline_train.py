"""``curvlake train --optimizer mfac``: config, optimizer, and a killed run that resumes bit for
bit (the window, Gram matrix, K⁻¹ and counters are stored per checkpoint)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.errors import UserInputError
from curvlake.lake import artifact_id, open_lake
from curvlake.nn.models import build_model
from curvlake.nn.training import MFAC_DEFAULTS, TrainConfig, make_optimizer
from curvlake.pipelines import train as train_pipeline
from curvlake.pipelines.mfac import MFAC
from curvlake.pipelines.train import run_train, stored_run_config

REPO = Path(__file__).resolve().parents[2]
MFAC_RUN = {
    "model": "mlp",
    "model_params": {"widths": [16]},
    "optimizer": "mfac",
    "mfac": {"n_grads": 24, "damp": 1e-4, "momentum": 0.5},
    "lr": 0.01,
    "batch_size": 64,
    "epochs": 4,
    "save_every": 1,
    "device": "cpu",
}
WINDOW_ARRAYS = ("theta", "opt_state", "mfac_window", "mfac_gram", "mfac_inverse", "mfac_state")


def test_mfac_options_are_filled_validated_and_set_by_dotted_keys():
    config = TrainConfig.from_dict(
        {"optimizer": "mfac", "mfac.n_grads": 64, "mfac.damp": "1e-4", "model_params.widths": [8]}
    )
    assert config.mfac == {**MFAC_DEFAULTS, "n_grads": 64, "damp": 1e-4}
    assert config.model_params == {"widths": [8]}
    assert TrainConfig.from_dict(config.to_dict()) == config
    merged = TrainConfig.from_dict({"optimizer": "mfac", "mfac": {"damp": 0.1}, "mfac.n_grads": 3})
    assert (merged.mfac["damp"], merged.mfac["n_grads"]) == (0.1, 3)
    for options, message in [
        ({"mfac.n_grads": 4}, r"mfac options \['n_grads'\] apply only to optimizer='mfac'"),
        ({"optimizer": "mfac", "mfac.ngrads": 4}, r"unknown mfac option\(s\) \['ngrads'\]"),
        ({"optimizer": "mfac", "mfac.n_grads": 0}, r"mfac.n_grads=0 \(allowed: an int >= 1\)"),
        ({"optimizer": "mfac", "mfac.damp": 0}, r"mfac.damp=0 \(allowed: a number > 0\)"),
        ({"optimizer": "mfac", "mfac.damp": "x"}, r"'mfac.damp' = 'x' is not a number"),
        ({"optimizer": "mfac", "mfac.momentum": 1}, r"mfac.momentum=1 \(allowed: in \[0, 1\)\)"),
        ({"optim.lr": 1}, r"unknown training option\(s\) 'optim.lr'"),
    ]:
        with pytest.raises(UserInputError, match=message):
            TrainConfig.from_dict(options)


def test_runs_of_other_optimizers_keep_their_ids():
    config = TrainConfig.from_dict({"model": "mlp", "epochs": 1})
    stored = stored_run_config(config)
    assert "mfac" not in stored
    legacy = {k: v for k, v in config.to_dict().items() if k != "mfac"}
    assert artifact_id("run", stored) == artifact_id("run", legacy)
    mfac = stored_run_config(TrainConfig.from_dict({"optimizer": "mfac"}))
    assert mfac["mfac"] == MFAC_DEFAULTS


def test_make_optimizer_builds_mfac_from_the_config():
    model = build_model("mlp", num_classes=3, input_shape=(4,), widths=[5])
    config = TrainConfig.from_dict(
        {"optimizer": "mfac", "lr": 0.1, "weight_decay": 0.01, "mfac": MFAC_RUN["mfac"]}
    )
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, MFAC)
    assert (optimizer.ngrads, optimizer.damp) == (24, 1e-4)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.5, 0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("mfac-reference") / "lake", create=True)
    return lake, run_train(lake, MFAC_RUN, progress=False)


def test_mfac_run_stores_its_window_per_checkpoint(reference):
    lake, run_id = reference
    ds = lake.open(run_id)
    assert ds.attrs["optimizer"] == "mfac"
    assert list(ds.opt_slot.values) == ["momentum_buffer"]
    n_params = ds.sizes["param"]
    assert ds["mfac_window"].shape == (5, 24, n_params)
    assert ds["mfac_gram"].shape == ds["mfac_inverse"].shape == (5, 24, 24)
    steps = ds["opt_step"].values
    np.testing.assert_array_equal(ds["mfac_state"].values[:, 0], steps)  # count = steps taken
    assert np.isnan(ds["mfac_inverse"].values[1]).all()  # 17 steps: still filling the window
    assert ds["mfac_state"].values[2, 3] == 1 and np.isfinite(ds["mfac_inverse"].values[2]).all()
    assert ds["test_accuracy"].values[-1] > ds["test_accuracy"].values[0] + 0.2


@pytest.mark.parametrize("killed_after", [2, 3])
def test_interrupted_run_resumes_bit_for_bit(reference, tmp_path, monkeypatch, killed_after):
    """Checkpoint 1 (17 steps) is in the warm-up of a 24-gradient window, 2 (34) has K⁻¹
    updated in place since its last refresh: the run resumes from either exactly."""
    lake0, reference_id = reference
    lake = open_lake(tmp_path / "lake", create=True)
    real = train_pipeline.flatten_optimizer_window
    saved: list[int] = []

    def killed(optimizer):
        saved.append(1)
        if len(saved) > killed_after:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        return real(optimizer)

    monkeypatch.setattr(train_pipeline, "flatten_optimizer_window", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(lake, MFAC_RUN, progress=False)
    monkeypatch.setattr(train_pipeline, "flatten_optimizer_window", real)
    messages: list[str] = []
    assert run_train(lake, MFAC_RUN, progress=False, echo=messages.append) == reference_id
    assert messages == [f"resuming {reference_id} at epoch {killed_after - 1} of 4"]
    got, expected = lake.open(reference_id), lake0.open(reference_id)
    for name in (*WINDOW_ARRAYS, "test_loss"):
        np.testing.assert_array_equal(got[name].values, expected[name].values, err_msg=name)


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_exact(tmp_path):
    config = {**MFAC_RUN, "epochs": 6, "batch_size": 8, "model_params": {"widths": [64]}}
    reference = open_lake(tmp_path / "reference", create=True)
    reference_id = run_train(reference, config, progress=False)
    lake_path = tmp_path / "lake"
    open_lake(lake_path, create=True)
    code = (
        "import json,sys; from curvlake.pipelines.train import run_train; "
        "run_train(sys.argv[1], json.loads(sys.argv[2]), progress=False)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(lake_path), json.dumps(config)], cwd=REPO
    )
    progress = lake_path / "_staging" / reference_id / "_progress" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and zarr.open_array(progress, mode="r")[:].sum() >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    lake = open_lake(lake_path)
    assert lake.info(reference_id).status == "writing", "the run finished before it was killed"
    assert run_train(lake, config, progress=False) == reference_id
    got, expected = lake.open(reference_id), reference.open(reference_id)
    for name in WINDOW_ARRAYS:
        np.testing.assert_array_equal(got[name].values, expected[name].values, err_msg=name)


def test_cli_trains_with_mfac(tmp_path):
    runner = CliRunner()
    lake = str(tmp_path / "lake")
    args = ["--lake", lake, "train", "--model", "mlp", "--param", "widths=[8]", "--epochs", "1"]
    args += ["--optimizer", "mfac", "--set", "mfac.n_grads=8", "--set", "mfac.damp=1e-3"]
    result = runner.invoke(cli, [*args, "--device", "cpu", "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"run-[0-9a-f]{16}", result.output).group(0)
    config = open_lake(lake).info(run_id).config
    assert config["mfac"]["n_grads"] == 8 and config["mfac"]["damp"] == 1e-3
    result = runner.invoke(cli, [*args[:9], "--set", "mfac.n_grads=8"])
    assert result.exit_code == 1 and "apply only to optimizer='mfac'" in result.output


def test_restored_optimizer_continues_identically():
    """The checkpoint helpers alone: flatten after some steps, restore into a fresh MFAC."""
    from curvlake.lake.checkpoints import (
        flatten_optimizer_state,
        flatten_optimizer_window,
        restore_optimizer_state,
        restore_optimizer_window,
    )

    def make(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        return model, MFAC(model.parameters(), lr=0.1, momentum=0.3, ngrads=5, damp=1e-3,
                           refresh_every=3)  # fmt: skip

    def step(model, opt, k):
        generator = torch.Generator().manual_seed(k)
        x, y = torch.randn(6, 3, generator=generator), torch.randn(6, 2, generator=generator)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    model, opt = make()
    for k in range(7):
        step(model, opt, k)
    slots, window = flatten_optimizer_state(opt), flatten_optimizer_window(opt)
    theta = [p.detach().clone() for p in model.parameters()]
    for k in range(7, 12):
        step(model, opt, k)
    other, restored = make(seed=1)
    with torch.no_grad():
        for p, value in zip(other.parameters(), theta, strict=True):
            p.copy_(value)
    restore_optimizer_state(restored, slots, 7)
    restore_optimizer_window(restored, window)
    for k in range(7, 12):
        step(other, restored, k)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
