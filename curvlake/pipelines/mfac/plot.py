"""``curvlake prune plot``: test accuracy against sparsity of a ``pruning`` artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from curvlake.lake import Lake
from curvlake.pipelines.skeleton import as_lake, output_path, require_artifact

__all__ = ["plot_pruning", "pruning_table"]

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def pruning_table(lake: Lake | str, pruning_id: str) -> dict[str, Any]:
    """The levels of a ``pruning`` artifact: per level the target and achieved sparsity, test
    loss and accuracy (and the magnitude baseline's, for M-FAC), the dense model's metrics."""
    lake = as_lake(lake)
    require_artifact(lake, pruning_id, "pruning", role="pruning")
    ds = lake.open(pruning_id)
    baseline = "baseline_test_accuracy" in ds
    gradual = "pruned_test_accuracy" in ds
    rows = []
    for level, sparsity in enumerate(ds["sparsity"].values):
        row = {
            "sparsity": float(sparsity),
            "achieved": float(ds["achieved_sparsity"].values[level]),
            "loss": float(ds["test_loss"].values[level]),
            "accuracy": float(ds["test_accuracy"].values[level]),
            "mask": str(ds["mask"].values[level]),
        }
        if gradual:
            row["pruned_accuracy"] = float(ds["pruned_test_accuracy"].values[level])
        if baseline:
            row["baseline_loss"] = float(ds["baseline_test_loss"].values[level])
            row["baseline_accuracy"] = float(ds["baseline_test_accuracy"].values[level])
            if gradual:
                row["baseline_pruned_accuracy"] = float(
                    ds["baseline_pruned_test_accuracy"].values[level]
                )
        rows.append(row)
    return {
        "method": ds.attrs["method"],
        "mode": ds.attrs["mode"],
        "dense_loss": float(ds.attrs["dense_test_loss"]),
        "dense_accuracy": float(ds.attrs["dense_test_accuracy"]),
        "rows": rows,
    }


def plot_pruning(lake: Lake | str, pruning_id: str, path: str | Path) -> Path:
    """Test accuracy against sparsity: the method, the magnitude baseline (M-FAC artifacts)
    and the dense model; gradual runs also show the accuracy before fine-tuning (dotted)."""
    path = output_path(path, FIGURE_SUFFIXES)
    table = pruning_table(lake, pruning_id)
    rows = table["rows"]
    sparsity = 100 * np.array([row["sparsity"] for row in rows])
    fig = Figure(figsize=(6, 4), layout="constrained")  # no pyplot: no GUI backend needed
    axes = fig.subplots()
    name = "M-FAC (OBS)" if table["method"] == "mfac" else "magnitude"
    axes.plot(sparsity, [row["accuracy"] for row in rows], marker="o", label=name)
    if "baseline_accuracy" in rows[0]:
        axes.plot(
            sparsity, [row["baseline_accuracy"] for row in rows], marker="s", label="magnitude"
        )
    if "pruned_accuracy" in rows[0]:
        axes.plot(
            sparsity,
            [row["pruned_accuracy"] for row in rows],
            linestyle=":",
            marker="o",
            color="C0",
            label=f"{name}, before fine-tuning",
        )
    axes.axhline(table["dense_accuracy"], color="grey", linestyle="--", label="dense")
    axes.set_xlabel("sparsity of the pruned tensors (%)")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"{table['mode']} pruning of {_run_of(lake, pruning_id)}")
    axes.legend()
    fig.savefig(path, dpi=120)
    return path


def _run_of(lake: Lake | str, pruning_id: str) -> str:
    return str(as_lake(lake).group(pruning_id).attrs["run"])
