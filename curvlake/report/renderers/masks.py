"""Figures of the parameter-mask kinds: ``mask``, ``pruning``."""

from __future__ import annotations

import numpy as np

from curvlake.lake import ArtifactInfo, Lake
from curvlake.pipelines.mfac.plot import pruning_table
from curvlake.report.figures import Figure, new_figure
from curvlake.report.renderers._registry import caption, renderer

#: Tensors drawn at most (the largest, in table order).
_MAX_TENSORS = 40


@renderer("mask")
def mask_figure(lake: Lake, info: ArtifactInfo):
    """Share of each parameter tensor in the mask."""
    group = lake.group(info.id)
    names = np.array([str(n) for n in group["layer"][:]])
    size = np.asarray(group["layer_size"][:])
    count = np.asarray(group["layer_count"][:])
    shown = np.sort(np.argsort(-size, kind="stable")[:_MAX_TENSORS])
    fig = new_figure(6, 1 + 0.18 * len(shown))
    ax = fig.subplots()
    y = np.arange(len(shown))
    ax.barh(y, count[shown] / np.maximum(size[shown], 1))
    ax.set_yticks(y, [f"{names[i]} ({size[i]})" for i in shown], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    total = int(group.attrs["n_params"])
    ax.set_xlabel("share of the tensor's entries in the mask")
    ax.set_title(
        f"{group.attrs['source']} mask: {int(count.sum())} of {total} parameters "
        f"({count.sum() / max(total, 1):.1%})"
    )
    more = f" (the {_MAX_TENSORS} largest)" if len(shown) < len(names) else ""
    yield Figure(
        f"{info.id}-layers", caption(info, f"Coordinates of the mask per tensor{more}"), fig
    )


@renderer("pruning")
def pruning_figure(lake: Lake, info: ArtifactInfo):
    """Test accuracy and loss against sparsity: the pruner and (M-FAC) its magnitude baseline."""
    table = pruning_table(lake, info.id)
    rows = table["rows"]
    sparsity = [row["sparsity"] for row in rows]
    curves = [("", "M-FAC OBS" if table["method"] == "mfac" else "magnitude", "o")]
    if "baseline_accuracy" in rows[0]:
        curves.append(("baseline_", "magnitude", "s"))
    fig = new_figure(9, 3)
    accuracy_ax, loss_ax = fig.subplots(1, 2)
    for prefix, label, marker in curves:
        accuracy_ax.plot(
            sparsity, [r[f"{prefix}accuracy"] for r in rows], marker=marker, label=label
        )
        loss_ax.plot(sparsity, [r[f"{prefix}loss"] for r in rows], marker=marker, label=label)
        if f"{prefix}pruned_accuracy" in rows[0]:
            accuracy_ax.plot(
                sparsity,
                [r[f"{prefix}pruned_accuracy"] for r in rows],
                marker=marker,
                linestyle=":",
                label=f"{label}, before fine-tuning",
            )
    accuracy_ax.axhline(table["dense_accuracy"], color="0.4", linestyle="--", label="dense")
    loss_ax.axhline(table["dense_loss"], color="0.4", linestyle="--", label="dense")
    for ax, metric in ((accuracy_ax, "accuracy"), (loss_ax, "loss")):
        ax.set_xlabel("sparsity of the pruned tensors")
        ax.set_ylabel(f"test {metric}")
        ax.legend()
    accuracy_ax.set_title(f"{table['mode']} pruning")
    yield Figure(
        f"{info.id}-sparsity",
        caption(
            info,
            "Test accuracy and loss of the pruned model against sparsity, M-FAC against magnitude",
        ),
        fig,
    )
