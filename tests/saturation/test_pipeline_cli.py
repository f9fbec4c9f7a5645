"""The command line of the PHD-LAB family: train --track, saturation, latents, probes,
receptive-field (the groups are invoked directly; curvlake/cli.py registers them)."""

import re

import click
import pandas as pd
import pytest
from click.testing import CliRunner

from curvlake._cli.common import CurvlakeGroup, Settings
from curvlake._cli.latents import latents
from curvlake._cli.probes import probes
from curvlake._cli.receptive_field import receptive_field
from curvlake._cli.saturation import saturation
from curvlake._cli.train import train
from tests.saturation.pipeline_cases import planted_latents, write_phdlab_latents, write_phdlab_log

TRAIN = ["--model", "cnn5_k", "--param", "k=2", "--epochs", "2", "--device", "cpu"]


@click.group(cls=CurvlakeGroup)
def root():
    """Stands for curvlake's root group (errors as one line)."""


for _command in (train, saturation, latents, probes, receptive_field):
    root.add_command(_command)


def _invoke(lake_url, command, args, ok=True):
    settings = Settings(lake_url, None, None, "sync", None)
    result = CliRunner().invoke(root, [command.name, *args], obj=settings, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _id(kind, text):
    return re.search(rf"{kind}-[0-9a-f]{{16}}", text).group(0)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    lake_url = str(tmp_path_factory.mktemp("cli") / "lake")
    out = _invoke(lake_url, train, [*TRAIN, "--track", "saturation", "--delta", "0.95"]).output
    return lake_url, _id("run", out), _id("saturation", out)


def test_train_track_then_plot_compute_and_project(tracked, tmp_path):
    lake_url, run_id, saturation_id = tracked
    out = _invoke(lake_url, saturation, ["plot", "--run", run_id, "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 1000 and "wrote" in out.output
    out = _invoke(
        lake_url, saturation, ["compute", "--run", run_id, "--delta", "0.95", "--n-examples", "50"]
    )
    assert "epoch phase" in out.output and _id("saturation", out.output) != saturation_id
    out = _invoke(
        lake_url,
        saturation,
        ["project", "--run", run_id, "--deltas", "0.9,3", "--random", "--n-examples", "40"],
    )
    assert "random acc" in out.output and _id("saturation_projection", out.output)


def test_latents_probes_receptive_field_and_probe_plot(tracked, tmp_path):
    lake_url, run_id, saturation_id = tracked
    out = _invoke(
        lake_url, latents, ["extract", "--run", run_id, "--pool", "1", "--n-examples", "120"]
    )
    latents_id = _id("latents", out.output)
    assert "layer4.0: 16,1,1" in out.output
    out = _invoke(lake_url, probes, ["fit", latents_id, "--C", "0.5"])
    probes_id = _id("probes", out.output)
    assert "converged" in out.output and "layer1.0" in out.output
    out = _invoke(lake_url, receptive_field, ["--run", run_id])
    rf_id = _id("receptive_field", out.output)
    assert "border layer layer3.0" in out.output
    png = tmp_path / "p.png"
    args = ["plot", probes_id, "--receptive-field", rf_id, "--saturation", saturation_id]
    _invoke(lake_url, probes, [*args, "--out", str(png)])
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (train, [*TRAIN, "--delta", "0.9"], "--delta does not apply without --track saturation"),
        (train, [*TRAIN, "--track", "saturation", "--layers", "^x$"], "matches no feature layer"),
        (latents, ["extract", "--run", "RUN", "--pool", "2", "--pixelwise"], "--pool does not"),
        (probes, ["plot", "probes-0123456789abcdef", "--epoch", "1"], "--epoch does not apply"),
        (receptive_field, ["--run", "RUN", "--input-size", "8,8"], "--input-size does not"),
        (receptive_field, ["--model", "cnn5_k"], "give --input-size H,W with --model"),
        (saturation, ["project", "--run", "RUN", "--seed", "1"], "seed does not apply"),
        (saturation, ["plot"], "give exactly one of SATURATION_ID, run"),
    ],
)
def test_bad_options_are_one_line_errors(tracked, command, args, message):
    lake_url, run_id, _ = tracked
    result = _invoke(lake_url, command, [a.replace("RUN", run_id) for a in args], ok=False)
    assert result.exit_code != 0
    assert message in result.output and result.output.count("\n") == 1, result.output


def test_import_detects_the_three_phdlab_formats(tmp_path):
    lake_url = str(tmp_path / "lake")
    write_phdlab_log(tmp_path / "log.csv", ["conv1", "fc"], 2)
    out = _invoke(lake_url, saturation, ["import", str(tmp_path / "log.csv")])
    assert "saturation imported" in out.output
    folder = write_phdlab_latents(tmp_path / "latents", planted_latents(n_train=20, n_test=8))
    out = _invoke(lake_url, saturation, ["import", str(folder), "--layers", "fc,conv1"])
    assert "latents imported" in out.output
    rows = {"name": ["train-fc", "train-conv1"], "train_acc": [0.9, 0.5], "eval_acc": [0.8, 0.4]}
    pd.DataFrame(rows).to_csv(tmp_path / "4x4_probe_performances.csv", sep=";")
    out = _invoke(lake_url, saturation, ["import", str(tmp_path / "4x4_probe_performances.csv")])
    assert "probes imported" in out.output
    refused = _invoke(
        lake_url, saturation, ["import", str(tmp_path / "log.csv"), "--layers", "a"], ok=False
    )
    assert "--layers does not apply to a per-epoch log" in refused.output
