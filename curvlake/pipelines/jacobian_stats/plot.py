"""``curvlake stats plot``: a statistic and train/test error against model width."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from curvlake.errors import UserInputError
from curvlake.lake import Lake


def run_width(config: dict, fallback: float) -> float:
    """The width of a run's model: ``k`` for the ``_k`` families, else the first hidden width."""
    params = config.get("model_params", {})
    if "k" in params:
        return float(params["k"])
    if params.get("widths"):
        return float(params["widths"][0])
    return float(fallback)


def width_table(lake: Lake, stats_id: str, metric: str, checkpoint: int = -1) -> dict:
    """Per run: width, mean and std of ``metric`` over examples, train/test error at that epoch."""
    ds = lake.open(stats_id)
    if metric not in ds:
        stored = ", ".join(ds.attrs["metrics"])
        raise UserInputError(f"{stats_id} has no {metric!r}; it stores: {stored}")
    values = ds[metric].isel(checkpoint=checkpoint).values  # (run, example)
    rows = []
    for r, run_id in enumerate(str(v) for v in ds["run"].values):
        info = lake.info(run_id)
        epoch = int(ds["checkpoint_epoch"].values[r, checkpoint])
        run = lake.open(run_id)
        rows.append(
            {
                "run": run_id,
                "width": run_width(info.config, r),
                "mean": float(np.mean(values[r])),
                "std": float(np.std(values[r])),
                "train_error": 1 - float(run["train_accuracy"].sel(epoch=epoch)),
                "test_error": 1 - float(run["test_accuracy"].sel(epoch=epoch)),
                "epoch": epoch,
            }
        )
    rows.sort(key=lambda row: row["width"])
    return {key: [row[key] for row in rows] for key in rows[0]}


def plot_width_sweep(
    lake: Lake,
    stats_id: str,
    path: str | Path,
    *,
    metric: str = "jacobian_operator",
    checkpoint: int = -1,
) -> Path:
    """Two panels against width: mean ``metric`` (± one std over examples), and errors."""
    table = width_table(lake, stats_id, metric, checkpoint)
    ds = lake.open(stats_id)
    widths = np.array(table["width"])
    fig = Figure(figsize=(10, 4), layout="constrained")  # no pyplot: no GUI backend needed
    left, right = fig.subplots(1, 2)
    left.errorbar(widths, table["mean"], yerr=table["std"], marker="o", capsize=3)
    left.set_xscale("log", base=2)
    left.set_xlabel("width")
    left.set_ylabel(f"mean {metric} ({ds.attrs['split']}, {ds.attrs['normalization']})")
    left.set_title(f"{metric} at epoch {table['epoch'][0]}")
    right.plot(widths, table["train_error"], marker="o", label="train error (noisy labels)")
    right.plot(widths, table["test_error"], marker="s", label="test error")
    right.set_xscale("log", base=2)
    right.set_xlabel("width")
    right.set_ylabel("error")
    right.legend()
    right.set_title("error")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
