"""What the command line prints: help on every option, ``lake ls`` that never cuts a value,
a resumed training that says so, and ``stats plot`` series per model family."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

import curvlake.pipelines.train as train_pipeline
from curvlake._cli.lake import whole_tokens
from curvlake.cli import cli
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.jacobian_stats.plot import width_sweep_figure, width_table
from curvlake.pipelines.train import run_train

TINY = {"epochs": 1, "device": "cpu", "batch_size": 256}


def _commands(command: click.Command, path: tuple[str, ...] = ("curvlake",)):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def test_every_option_has_help_and_says_its_default():
    missing, undocumented = [], []
    for path, command in _commands(cli):
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            where = f"{' '.join(path)} {param.opts[0]}"
            if not (param.help or "").strip():
                missing.append(where)
            default = param.to_info_dict()["default"]  # None when there is none
            has_default = default not in (None, (), False) and not param.is_flag
            if has_default and not (param.show_default or "default" in param.help.lower()):
                undocumented.append(where)
    assert not missing, f"options without help: {missing}"
    assert not undocumented, f"defaults not shown: {undocumented}"


def test_whole_tokens_never_cuts_a_pair():
    text = 'model=mlp model_params={"widths":[8]} dataset=digits epochs=1'
    assert whole_tokens(text, 100) == text
    assert whole_tokens(text, 40) == 'model=mlp model_params={"widths":[8]} …'
    assert whole_tokens(text, 12) == "model=mlp …"
    assert whole_tokens(text, 5) == "…"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two model families, one run with label noise, a run of another length, and a model
    without a width (logistic regression)."""
    lake = open_lake(tmp_path_factory.mktemp("sweep") / "lake", create=True)
    runs = {
        "mlp": run_train(lake, {**TINY, "model_params": {"widths": [8]}}, progress=False),
        "noisy": run_train(
            lake, {**TINY, "model_params": {"widths": [16]}, "label_noise": 0.2}, progress=False
        ),
        "cnn": run_train(
            lake,
            {**TINY, "epochs": 2, "model": "cnn5_k", "model_params": {"k": 2}},
            progress=False,
        ),
        "logreg": run_train(lake, {**TINY, "model_params": {"widths": []}}, progress=False),
    }
    options = {"metrics": ["accuracy"], "block_size": 512, "progress": False}
    stats = run_stats(lake, [runs["mlp"], runs["noisy"], runs["cnn"]], **options)
    no_width = run_stats(lake, [runs["logreg"]], **options)
    return lake, runs, stats, no_width


def test_lake_ls_fits_the_terminal_at_whole_pairs(sweep):
    lake, runs, _, _ = sweep
    result = CliRunner().invoke(cli, ["--lake", lake.url, "lake", "ls"], env={"COLUMNS": "110"})
    assert result.exit_code == 0, result.output
    summaries = {i.id: i.config_summary.split(" ") for i in lake.list()}
    header, *lines = result.output.splitlines()
    for line in lines:
        assert len(line) <= 110, line
        artifact = line.split()[0]
        shown = line[header.index("CONFIG") :].split(" ")
        kept = [token for token in shown if token != "…"]
        assert kept == summaries[artifact][: len(kept)], line  # whole pairs, in order
    assert "…" in result.output
    wide = CliRunner().invoke(cli, ["--lake", lake.url, "lake", "ls"], env={"COLUMNS": "400"})
    assert lake.info(runs["mlp"]).config_summary in wide.output


class Interrupted(Exception):
    pass


def test_resumed_training_says_where_it_resumes(tmp_path, monkeypatch):
    lake = open_lake(tmp_path / "lake", create=True)
    options = ["--epochs", "4", "--save-every", "1", "--param", "widths=[4]", "--device", "cpu"]
    train_epochs = train_pipeline.train_epochs

    def stopped_after_two(*args, on_epoch_end, **kwargs):
        def end(epoch, metrics):
            on_epoch_end(epoch, metrics)
            if epoch == 2:
                raise Interrupted

        return train_epochs(*args, on_epoch_end=end, **kwargs)

    monkeypatch.setattr(train_pipeline, "train_epochs", stopped_after_two)
    with pytest.raises(Interrupted):
        CliRunner().invoke(cli, ["--lake", lake.url, "train", *options], catch_exceptions=False)
    monkeypatch.setattr(train_pipeline, "train_epochs", train_epochs)
    result = CliRunner().invoke(cli, ["--lake", lake.url, "train", *options])
    assert result.exit_code == 0, result.output
    resumed = re.search(r"resuming (run-[0-9a-f]{16}) at epoch 2 of 4", result.output)
    assert resumed, result.output
    assert lake.info(resumed.group(1)).status == "complete"
    again = CliRunner().invoke(cli, ["--lake", lake.url, "train", *options])
    assert "resuming" not in again.output  # complete: reused, nothing resumed


def test_stats_plot_draws_one_series_per_family_with_its_epoch(sweep):
    lake, _, stats, _ = sweep
    table = width_table(lake, stats, "accuracy")
    assert table["series"] == ["cnn5_k", "mlp", "mlp, 0.2 label noise"]
    assert table["epoch"] == [2, 1, 1]
    figure = width_sweep_figure(lake, stats)
    left, right = figure.axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == [
        "cnn5_k (epoch 2)",
        "mlp (epoch 1)",
        "mlp, 0.2 label noise (epoch 1)",
    ]
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert [label for label in labels if "noisy labels" in label] == [
        "mlp, 0.2 label noise (epoch 1): train error (noisy labels)"
    ]


def test_stats_plot_cli_prints_the_series(sweep, tmp_path):
    lake, _, stats, no_width = sweep
    out = tmp_path / "sweep.png"
    result = CliRunner().invoke(cli, ["--lake", lake.url, "stats", "plot", stats, "--out", out])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    rows = result.output.splitlines()[1:-1]
    assert [row.split()[0] for row in rows] == ["cnn5_k", "mlp", "mlp,"]
    with pytest.raises(UserInputError, match="has no width parameter"):
        width_table(lake, no_width, "accuracy")


def test_stats_compute_finds_the_runs_of_a_grid(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model_params: {widths: [4]}\nlr: [0.01, 0.02]\nepochs: 1\ndevice: cpu\n")
    base = ["--lake", str(tmp_path / "lake"), "--cluster", "sync"]
    trained = CliRunner().invoke(cli, [*base, "train", "--grid", str(grid)])
    assert trained.exit_code == 0, trained.output
    run_ids = re.findall(r"(run-[0-9a-f]{16})  mlp", trained.output)
    assert len(run_ids) == 2
    result = CliRunner().invoke(
        cli, [*base, "stats", "compute", "--grid", str(grid), "--metric", "accuracy"]
    )
    assert result.exit_code == 0, result.output
    stats_id = re.search(r"jacobian_stats-[0-9a-f]{16}", result.output).group()
    assert open_lake(tmp_path / "lake").info(stats_id).inputs == run_ids
