"""``curvlake stats plot``: a statistic and train/test error against model width.

Runs of different model families (``cnn5_k`` and ``mlp``, or ``mlp`` of another depth) and
different label noise are different series: their widths are not on one scale, so each family
gets its own line, titled with the epoch its points are at.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.skeleton import output_path, require_artifact
from curvlake.validation import Interval, check

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Figure formats ``stats plot --out`` writes.
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def run_width(config: dict) -> float | None:
    """The width of a run's model: ``k`` for the ``_k`` families, else the first hidden width
    (None for a model without a width parameter)."""
    params = config.get("model_params") or {}
    if "k" in params:
        return float(params["k"])
    if params.get("widths"):
        return float(params["widths"][0])
    return None


def run_family(config: dict) -> str:
    """The model family of a run: its model and every model parameter except the width
    (an MLP's depth included), e.g. ``cnn5_k`` or ``mlp depth=2``."""
    params = dict(config.get("model_params") or {})
    params.pop("k", None)
    widths = params.pop("widths", None)
    if widths and len(widths) > 1:
        params["depth"] = len(widths)
    extra = " ".join(f"{key}={value}" for key, value in sorted(params.items()))
    return f"{config.get('model', 'custom')} {extra}".strip()


def _series_name(family: str, label_noise: float) -> str:
    return f"{family}, {label_noise:g} label noise" if label_noise > 0 else family


def default_metric(lake: Lake, stats_id: str) -> str:
    """The statistic ``stats plot`` draws without ``--metric``: the first stored one."""
    require_artifact(lake, stats_id, "jacobian_stats", role="statistics artifact")
    return str(lake.group(stats_id).attrs["metrics"][0])


def width_table(lake: Lake, stats_id: str, metric: str, checkpoint: int = -1) -> dict:
    """Per run: series, width, mean and std of ``metric`` over examples, train/test error at
    that checkpoint's epoch; sorted by series, then width.

    Raises:
        UserInputError: not a ``jacobian_stats`` artifact, a metric it does not store, a
            checkpoint out of range, or a run whose model has no width parameter.
    """
    require_artifact(lake, stats_id, "jacobian_stats", role="statistics artifact")
    ds = lake.open(stats_id)
    if metric not in ds:
        stored = ", ".join(ds.attrs["metrics"])
        raise UserInputError(f"{stats_id} has no {metric!r}; it stores: {stored}")
    n_checkpoints = ds.sizes["checkpoint"]
    check(
        "checkpoint",
        checkpoint,
        Interval(int, -n_checkpoints, n_checkpoints - 1),
        context=f"{stats_id} has checkpoints 0..{n_checkpoints - 1}, or negative from the end",
    )
    values = ds[metric].isel(checkpoint=checkpoint).values  # (run, example)
    rows = []
    for r, run_id in enumerate(str(v) for v in ds["run"].values):
        config = lake.info(run_id).config
        width = run_width(config)
        if width is None:
            raise UserInputError(
                f"run {run_id} ({config.get('model', 'custom')}) has no width parameter (k or "
                f"widths), so {stats_id} cannot be drawn against width; read the values with "
                f"`curvlake lake show {stats_id}`"
            )
        label_noise = float(config.get("label_noise") or 0.0)
        epoch = int(ds["checkpoint_epoch"].values[r, checkpoint])
        run = lake.open(run_id)
        rows.append(
            {
                "run": run_id,
                "series": _series_name(run_family(config), label_noise),
                "label_noise": label_noise,
                "width": width,
                "mean": float(np.mean(values[r])),
                "std": float(np.std(values[r])),
                "train_error": 1 - float(run["train_accuracy"].sel(epoch=epoch)),
                "test_error": 1 - float(run["test_accuracy"].sel(epoch=epoch)),
                "epoch": epoch,
            }
        )
    rows.sort(key=lambda row: (row["series"], row["width"]))
    return {key: [row[key] for row in rows] for key in rows[0]}


def _epochs(epochs: list[int]) -> str:
    distinct = sorted(set(epochs))
    return (
        f"epoch {distinct[0]}" if len(distinct) == 1 else f"epochs {', '.join(map(str, distinct))}"
    )


def plot_width_sweep(
    lake: Lake,
    stats_id: str,
    path: str | Path,
    *,
    metric: str | None = None,
    checkpoint: int = -1,
) -> Path:
    """Write :func:`width_sweep_figure` to ``path`` (.png, .pdf or .svg), checked before the
    statistics are read."""
    require_artifact(lake, stats_id, "jacobian_stats", role="statistics artifact")
    path = output_path(path, FIGURE_SUFFIXES)
    width_sweep_figure(lake, stats_id, metric=metric, checkpoint=checkpoint).savefig(path, dpi=120)
    return path


def width_sweep_figure(
    lake: Lake, stats_id: str, *, metric: str | None = None, checkpoint: int = -1
) -> Figure:
    """Two panels against width: mean ``metric`` (± one std over examples; default: the first
    stored statistic), and train/test errors; one series per model family and label noise,
    each titled with its epoch. Train error is labelled "noisy labels" only for runs trained
    with label noise."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    metric = metric or default_metric(lake, stats_id)
    table = width_table(lake, stats_id, metric, checkpoint)
    ds = lake.open(stats_id)
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    series = np.array(table["series"])
    for i, name in enumerate(dict.fromkeys(table["series"])):
        rows = np.flatnonzero(series == name)
        widths = np.array(table["width"])[rows]
        color = f"C{i % 10}"
        title = f"{name} ({_epochs([table['epoch'][r] for r in rows])})"
        means, stds = np.array(table["mean"])[rows], np.array(table["std"])[rows]
        left.errorbar(widths, means, yerr=stds, marker="o", capsize=3, color=color, label=title)
        noisy = table["label_noise"][rows[0]] > 0
        train = "train error (noisy labels)" if noisy else "train error"
        right.plot(
            widths,
            np.array(table["train_error"])[rows],
            marker="o",
            color=color,
            label=f"{title}: {train}",
        )
        right.plot(
            widths,
            np.array(table["test_error"])[rows],
            marker="s",
            linestyle="--",
            color=color,
            label=f"{title}: test error",
        )
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.legend(fontsize=7)
    left.set_ylabel(f"mean {metric} ({ds.attrs['split']}, {ds.attrs['normalization']})")
    left.set_title(f"mean {metric}")
    right.set_ylabel("error")
    right.set_title("error")
    return fig
