"""Training into the lake: artifacts, resume after SIGKILL, model import/export, grids, data."""

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
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.nn.models import build_model
from curvlake.pipelines.data import import_dataset, load_dataset_artifact
from curvlake.pipelines.runs import export_state_dict, import_run
from curvlake.pipelines.train import run_grid, run_train

REPO = Path(__file__).resolve().parents[2]
SMALL = {
    "model": "mlp",
    "model_params": {"widths": [16]},
    "epochs": 4,
    "save_every": 1,
    "device": "cpu",
    "lr": 0.05,
    "batch_size": 64,
    "label_noise": 0.2,
    "label_seed": 3,
}


def test_run_artifact_contents(tmp_path):
    lake = open_lake(tmp_path, create=True)
    run_id = run_train(lake, SMALL, progress=False)
    ds = lake.open(run_id)
    assert ds.sizes["checkpoint"] == 5 and list(ds.checkpoint_epoch.values) == [0, 1, 2, 3, 4]
    assert ds.theta.dtype == np.float32 and ds.sizes["param"] == 64 * 16 + 16 + 16 * 10 + 10
    assert list(ds.layer.values) == ["0.weight", "0.bias", "2.weight", "2.bias"] or len(ds.layer)
    assert int(ds.layer_size.sum()) == ds.sizes["param"]
    assert np.isnan(float(ds.train_loss[0])) and not np.isnan(float(ds.val_loss[0]))
    assert float(ds.test_accuracy[-1]) > 0.5
    noisy = ds.train_label.values != ds.train_clean_label.values
    assert noisy.sum() == round(0.2 * ds.sizes["train_example"])
    # The final checkpoint is the model load_model returns.
    model = load_model(lake, run_id)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(flat, ds.theta[-1].values)
    assert run_train(lake, SMALL, progress=False) == run_id  # complete -> reused


def _spawn_training(lake_path, config):
    code = (
        "import json,sys; from curvlake.pipelines.train import run_train; "
        "run_train(sys.argv[1], json.loads(sys.argv[2]), progress=False)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(lake_path), json.dumps(config)], cwd=REPO
    )


def test_killed_run_resumes_bit_exact(tmp_path):
    config = {**SMALL, "epochs": 6, "model_params": {"widths": [128, 128]}, "batch_size": 8}
    reference = open_lake(tmp_path / "reference", create=True)
    reference_id = run_train(reference, config, progress=False)

    lake_path = tmp_path / "lake"
    open_lake(lake_path, create=True)
    process = _spawn_training(lake_path, config)
    progress = lake_path / "_staging" / reference_id / "_progress" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists():
            done = zarr.open_array(progress, mode="r")[:]
            if done.sum() >= 2:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    lake = open_lake(lake_path)
    assert lake.info(reference_id).status == "writing", "the run finished before it was killed"
    assert run_train(lake, config, progress=False) == reference_id
    got, expected = lake.open(reference_id), reference.open(reference_id)
    np.testing.assert_array_equal(got.theta.values, expected.theta.values)
    np.testing.assert_array_equal(got.opt_state.values, expected.opt_state.values)
    np.testing.assert_array_equal(got.test_loss.values, expected.test_loss.values)


def test_adam_with_batchnorm_resume_state(tmp_path):
    config = {
        "model": "cnn5_k",
        "model_params": {"k": 2, "batch_norm": True},
        "epochs": 2,
        "save_every": 1,
        "optimizer": "adam",
        "lr": 0.01,
        "device": "cpu",
    }
    lake = open_lake(tmp_path, create=True)
    run_id = run_train(lake, config, progress=False)
    ds = lake.open(run_id)
    assert list(ds.opt_slot.values) == ["exp_avg", "exp_avg_sq"]
    assert "buffers" in ds and ds.buffers.dtype == np.float64
    model = load_model(lake, run_id, checkpoint=1)
    assert model.state_dict()  # builds and loads


def test_import_export_round_trip_bit_exact(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    net = build_model("cnn5_k", num_classes=10, input_shape=(1, 8, 8), k=2, batch_norm=True)
    with torch.no_grad():
        for buffer in net.buffers():
            buffer.add_(torch.rand(buffer.shape) if buffer.is_floating_point() else 7)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    run_id = import_run(
        lake,
        tmp_path / "weights.pt",
        model="cnn5_k",
        model_params={"k": 2, "batch_norm": True},
        num_classes=10,
        input_shape=(1, 8, 8),
    )
    export_state_dict(lake, run_id, tmp_path / "out.pt")
    original = torch.load(tmp_path / "weights.pt")
    exported = torch.load(tmp_path / "out.pt")
    assert original.keys() == exported.keys()
    for key in original:
        assert original[key].dtype == exported[key].dtype
        assert torch.equal(original[key], exported[key]), key


def test_import_torchscript_module(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    torch.jit.save(torch.jit.script(net), tmp_path / "net.ts")
    run_id = import_run(lake, tmp_path / "net.ts", num_classes=3, input_shape=(1, 8, 8))
    loaded = load_model(lake, run_id)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_import_state_dict_that_does_not_fit(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(UserInputError, match="does not fit model 'mlp'"):
        import_run(lake, tmp_path / "bad.pt", model="mlp", num_classes=10, input_shape=(1, 8, 8))


def test_grid_on_local_cluster_skips_complete(tmp_path):
    from curvlake.engine import client_session

    lake = open_lake(tmp_path, create=True)
    configs = [{**SMALL, "epochs": 1, "model_params": {"widths": [w]}} for w in (4, 8)]
    first = run_train(lake, configs[0], progress=False)
    with client_session(cluster="local", n_workers=2, threads_per_worker=1, processes=False):
        ids = run_grid(lake, configs, progress=False)
    assert ids[0] == first and len(set(ids)) == 2
    assert all(lake.info(i).status == "complete" for i in ids)


def test_data_import_and_train(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (60, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, 60)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    lake = open_lake(tmp_path / "lake", create=True)
    dataset_id = import_dataset(lake, tmp_path / "mine.npz")
    ds = lake.open(dataset_id)
    np.testing.assert_allclose(ds.x.values.reshape(60, 6, 6), x / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y.values, y)
    splits = load_dataset_artifact(lake, dataset_id, split_seed=1)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60
    run_id = run_train(
        lake, {"model": "mlp", "dataset": dataset_id, "epochs": 1, "device": "cpu"}, progress=False
    )
    assert lake.info(run_id).inputs == [dataset_id]
    with pytest.raises(UserInputError, match="--labels"):
        import_dataset(lake, _save(tmp_path / "x.npy", x))
    bad = x.astype(np.float32)
    bad[0, 0, 0] = np.nan
    np.savez(tmp_path / "bad.npz", x=bad, y=y)
    with pytest.raises(UserInputError, match="1 NaN or infinite"):
        import_dataset(lake, tmp_path / "bad.npz")


def _save(path, array):
    np.save(path, array)
    return path


def test_cli_train_and_export(tmp_path):
    runner = CliRunner()
    lake = str(tmp_path / "lake")
    result = runner.invoke(
        cli,
        [
            "--lake",
            lake,
            "train",
            "--model",
            "mlp",
            "--param",
            "widths=[8]",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    run_id = re.search(r"run-[0-9a-f]{16}", result.output).group(0)
    result = runner.invoke(cli, ["--lake", lake, "runs", "export", run_id, str(tmp_path / "w.pt")])
    assert result.exit_code == 0 and (tmp_path / "w.pt").exists()
    result = runner.invoke(cli, ["--lake", lake, "train", "--model", "nope", "--epochs", "1"])
    assert result.exit_code == 1 and "nope" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["--lake", lake, "train", "--set", "bogus=1"])
    assert result.exit_code == 1 and "bogus" in result.output
