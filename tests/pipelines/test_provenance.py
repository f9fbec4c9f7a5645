"""Inputs named by path enter ids and provenance by their content."""

import re

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits

from curvlake.cli import cli
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.train import run_train


def _write_npz(path, n=120, flip=False):
    digits = load_digits()
    x, y = digits.data[:n] / 16.0, digits.target[:n]
    if flip:
        x = x[::-1].copy()
    np.savez(path, x=x, y=y)


def _config(path):
    return {
        "model": "mlp",
        "model_params": {"widths": [8]},
        "dataset": str(path),
        "epochs": 1,
        "device": "cpu",
    }


def test_npz_dataset_is_identified_by_its_contents(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    data = tmp_path / "data.npz"
    _write_npz(data)
    first = run_train(lake, _config(data), progress=False)
    assert run_train(lake, _config(data), progress=False) == first
    sources = lake.group(first).attrs["curvlake:provenance"]["sources"]
    assert sources["dataset"].startswith(str(data)) and "sha256:" in sources["dataset"]
    _write_npz(data, flip=True)  # same path, new contents
    second = run_train(lake, _config(data), progress=False)
    assert second != first
    with pytest.raises(UserInputError, match="has changed since the run was made"):
        run_stats(lake, [first], metrics=["accuracy"], progress=False)
    data.unlink()
    with pytest.raises(UserInputError, match=f"dataset file {data} does not exist"):
        run_train(lake, _config(data), progress=False)


def test_config_file_is_recorded_with_its_hash(tmp_path):
    lake = tmp_path / "lake"
    config = tmp_path / "run.yaml"
    config.write_text("model: mlp\nmodel_params: {widths: [8]}\nepochs: 1\ndevice: cpu\n")
    result = CliRunner().invoke(cli, ["--lake", str(lake), "train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"run-[0-9a-f]{16}", result.output).group(0)
    sources = open_lake(lake).group(run_id).attrs["curvlake:provenance"]["sources"]
    assert sources["config_file"].startswith(str(config)) and "sha256:" in sources["config_file"]
    config.unlink()
    result = CliRunner().invoke(cli, ["--lake", str(lake), "train", "--config", str(config)])
    assert result.exit_code != 0 and "no such file" in result.output
