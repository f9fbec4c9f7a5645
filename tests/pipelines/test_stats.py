"""The dataset-statistics pipeline against direct kernel calls, and its invariances."""

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.engine import client_session
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.pipelines.jacobian_stats.metrics import compute_metric
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.train import as_train_config, run_train, training_data

BASE = {
    "model": "mlp",
    "dataset": "digits",
    "epochs": 2,
    "save_every": 1,
    "device": "cpu",
    "label_noise": 0.2,
    "lr": 0.05,
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    path = tmp_path_factory.mktemp("lake")
    lake = open_lake(path, create=True)
    runs = [
        run_train(lake, {**BASE, "model_params": {"widths": [w]}}, progress=False) for w in (4, 16)
    ]
    return lake, runs


def test_matches_direct_kernel_calls(sweep):
    lake, runs = sweep
    stats_id = run_stats(
        lake,
        runs,
        metrics=["jacobian_operator", "cross_entropy"],
        split="test",
        dtype="float64",
        block_size=100,
        progress=False,
    )
    ds = lake.open(stats_id)
    assert ds["jacobian_operator"].dims == ("run", "checkpoint", "example")
    assert ds.sizes == {"run": 2, "checkpoint": 3, "example": 359}
    assert list(ds.checkpoint_epoch.values[0]) == [0, 1, 2]
    splits, _, _ = training_data(lake, as_train_config(lake.info(runs[1]).config))
    model = load_model(lake, runs[1], checkpoint=1).double()
    x = torch.as_tensor(splits.test.x, dtype=torch.float64)
    y = torch.as_tensor(splits.test.y)
    expected = compute_metric(model, x, y, metric="jacobian_operator").numpy()
    np.testing.assert_allclose(ds["jacobian_operator"].values[1, 1], expected, rtol=1e-12)
    expected = compute_metric(model, x, y, metric="cross_entropy").numpy()
    np.testing.assert_allclose(ds["cross_entropy"].values[1, 1], expected, rtol=1e-12)
    np.testing.assert_array_equal(ds.sample_id.values, splits.test.sample_id)


def test_train_split_coords_and_every_example_once(sweep):
    lake, runs = sweep
    stats_id = run_stats(
        lake, runs[:1], metrics=["accuracy"], checkpoints=[-1], block_size=128, progress=False
    )
    ds = lake.open(stats_id)
    assert not np.isnan(ds["accuracy"].values).any()
    run = lake.open(runs[0])
    np.testing.assert_array_equal(ds.label.values[0], run.train_label.values)
    np.testing.assert_array_equal(ds.clean_label.values, run.train_clean_label.values)
    assert (ds.label.values[0] != ds.clean_label.values).sum() == round(0.2 * ds.sizes["example"])


@pytest.mark.parametrize("n_workers", [1, 2])
def test_invariant_to_blocks_and_workers(sweep, n_workers):
    lake, runs = sweep
    common = {
        "metrics": ["jacobian_frobenius"],
        "split": "val",
        "checkpoints": [-1],
        "normalization": "softmax",
        "progress": False,
    }
    reference = lake.open(run_stats(lake, runs, block_size=359, **common))
    with client_session(
        cluster="local", n_workers=n_workers, threads_per_worker=1, processes=False
    ):
        chunked = lake.open(run_stats(lake, runs, block_size=50 + n_workers, **common))
    np.testing.assert_allclose(
        chunked["jacobian_frobenius"].values, reference["jacobian_frobenius"].values, rtol=1e-5
    )


def test_bad_input_is_refused_before_any_work(sweep):
    lake, runs = sweep
    with pytest.raises(UserInputError, match="metric='nope'"):
        run_stats(lake, runs, metrics=["nope"])
    with pytest.raises(UserInputError, match=r"checkpoints 0\.\.2"):
        run_stats(lake, runs, checkpoints=[5])
    with pytest.raises(UserInputError, match="target_only"):
        run_stats(lake, runs, normalization="crossentropy", target_only=True)
    assert [i.status for i in lake.list("jacobian_stats")].count("writing") == 0


def test_cli_compute_and_plot(sweep, tmp_path):
    lake, runs = sweep
    runner = CliRunner()
    args = [
        "--lake",
        lake.url,
        "--cluster",
        "sync",
        "stats",
        "compute",
        "--run",
        runs[0],
        "--run",
        runs[1],
        "--checkpoints",
        "-1",
        "--split",
        "test",
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    stats_id = re.search(r"jacobian_stats-[0-9a-f]{16}", result.output).group(0)
    png = tmp_path / "sweep.png"
    result = runner.invoke(cli, ["--lake", lake.url, "stats", "plot", stats_id, "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test err" in result.output
