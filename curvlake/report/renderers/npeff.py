"""Figures of the NPEFF kinds: ``pefs``, ``dsf``, ``npeff``, ``npeff_perturbation``."""

from __future__ import annotations

import numpy as np

from curvlake.lake import ArtifactInfo, Lake
from curvlake.report.figures import Figure, new_figure, thin
from curvlake.report.renderers._images import mosaic, raw_images
from curvlake.report.renderers._registry import caption, renderer

#: Components and top examples per component in the collage.
N_COMPONENTS, N_TOP = 6, 8
#: PEF rows read for the decay of the stored entries.
_N_ROWS = 256


@renderer("pefs")
def pefs_figures(lake: Lake, info: ArtifactInfo):
    """PEF norms of correctly and wrongly predicted examples; decay of the stored entries."""
    group = lake.group(info.id)
    norm = np.asarray(group["dense_norm"][:], dtype=np.float64)
    correct = np.argmax(group["logits"][:], axis=1) == np.asarray(group["label"][:])
    stored = "values" in group
    fig = new_figure(8 if stored else 4.5, 3)
    axes = fig.subplots(1, 2 if stored else 1, squeeze=False)[0]
    positive = norm > 0
    bins = np.geomspace(norm[positive].min(), norm[positive].max(), 40) if positive.any() else 10
    for mask, label in ((correct, "correct"), (~correct, "wrong")):
        if (mask & positive).any():
            axes[0].hist(
                norm[mask & positive], bins=bins, alpha=0.6, label=f"{label} ({mask.sum()})"
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("Frobenius norm of the PEF")
    axes[0].set_ylabel("examples")
    axes[0].legend()
    axes[0].set_title(f"{group.attrs['pef_kind']} PEFs of {len(norm)} examples")
    what = "Norms of the per-example Fishers, by whether the model predicts the label"
    if stored:
        values = np.abs(np.asarray(group["values"][:_N_ROWS], dtype=np.float64))
        decay = np.mean(-np.sort(-values, axis=1), axis=0)
        rank, decay = thin(np.arange(1, decay.size + 1), decay)
        axes[1].loglog(rank, decay)
        axes[1].set_xlabel("rank of the stored entry")
        axes[1].set_ylabel("mean |value|")
        axes[1].set_title(f"top-{values.shape[1]} entries (first {len(values)} examples)")
        what += "; mean magnitude of the stored entries by rank"
    yield Figure(f"{info.id}-norms", caption(info, what), fig)


@renderer("dsf")
def dsf_figure(lake: Lake, info: ArtifactInfo):
    """The diagonal Fisher's entries sorted by size."""
    fisher = np.asarray(lake.group(info.id)["fisher"][:], dtype=np.float64)
    ordered = -np.sort(-fisher)
    rank, ordered = thin(np.arange(1, ordered.size + 1), ordered)
    fig = new_figure(4.5, 3)
    ax = fig.subplots()
    ax.loglog(rank, np.where(ordered > 0, ordered, np.nan))
    ax.set_xlabel("parameter rank")
    ax.set_ylabel("diagonal Fisher")
    ax.set_title(f"{fisher.size} parameters, {np.count_nonzero(fisher)} non-zero")
    yield Figure(f"{info.id}-sorted", caption(info, "Diagonal Fisher entries, sorted"), fig)


@renderer("npeff")
def npeff_figures(lake: Lake, info: ArtifactInfo):
    """Loss per iteration; the top examples of the first components."""
    group = lake.group(info.id)
    loss = np.asarray(group["loss"][:])
    fig = new_figure(4.5, 3)
    ax = fig.subplots()
    iteration, shown = thin(np.arange(loss.size), loss)
    ax.semilogy(iteration, shown, label="relative loss")
    if "objective" in group:
        ax.semilogy(
            *thin(np.arange(loss.size), np.asarray(group["objective"][:])), label="objective"
        )
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("||A - WH||_F / ||A||_F")
    ax.set_title(f"{group.attrs['n_components']} components, {group.attrs['solver']}")
    yield Figure(f"{info.id}-loss", caption(info, "NPEFF loss per iteration"), fig)
    yield _top_examples(lake, info, group)


def _top_examples(lake: Lake, info: ArtifactInfo, group) -> Figure:
    """The collage of the top examples (images), else the labels of the top examples."""
    W = np.asarray(group["W"][:], dtype=np.float64)
    components = range(min(N_COMPONENTS, W.shape[1]))
    n_top = min(N_TOP, W.shape[0])
    # largest W first, ties to the smaller example position (as npeff top)
    top = np.stack([np.lexsort((np.arange(len(W)), -W[:, j]))[:n_top] for j in components])
    label = np.asarray(group["label"][:])
    images = raw_images(lake, info.id, np.asarray(group["sample_id"][:])[top.ravel()])
    if images is not None:
        fig = new_figure(1.0 * n_top + 1, 1.0 * len(components) + 0.6)
        ax = fig.subplots()
        tiles = mosaic(images, n_cols=n_top)
        ax.imshow(tiles, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        tile_h = (tiles.shape[0] - 1) / len(components)
        tile_w = (tiles.shape[1] - 1) / n_top
        ax.set_yticks(
            (np.arange(len(components)) + 0.5) * tile_h, [f"component {j}" for j in components]
        )
        ax.set_xticks((np.arange(n_top) + 0.5) * tile_w, [f"#{r + 1}" for r in range(n_top)])
        for j in components:
            for r, p in enumerate(top[j]):
                ax.text(
                    r * tile_w + 1.5,
                    j * tile_h + 1.5,
                    str(label[p]),
                    color="tab:red",
                    fontsize=6,
                    va="top",
                )
        ax.set_title("top examples (largest W) of each component; red: label")
        return Figure(
            f"{info.id}-top-examples",
            caption(
                info, f"Top {n_top} examples of components 0-{len(components) - 1} (raw inputs)"
            ),
            fig,
        )
    fig = new_figure(5, 3)
    ax = fig.subplots()
    classes = np.unique(label)
    bottom = np.zeros(len(components))
    for c in classes:
        share = np.array([np.mean(label[top[j]] == c) for j in components])
        ax.bar(list(components), share, bottom=bottom, label=f"label {c}")
        bottom += share
    ax.set_xlabel("component")
    ax.set_ylabel(f"share of its top {n_top} examples")
    ax.legend(fontsize=6, ncols=2)
    return Figure(
        f"{info.id}-top-labels",
        caption(info, f"Labels of the top {n_top} examples of each component (inputs not images)"),
        fig,
    )


@renderer("npeff_perturbation")
def perturbation_figure(lake: Lake, info: ArtifactInfo):
    """KL ratio top / baseline per component and sign; accuracies before and after."""
    ds = lake.open(info.id)
    component = ds["component"].values
    fig = new_figure(9, 3)
    kl_ax, accuracy_ax = fig.subplots(1, 2)
    x = np.arange(len(component))
    for s, sign in enumerate(ds["sign"].values):
        kl_ax.bar(x + (s - 0.5) * 0.4, ds["kl_ratio"].values[:, s], 0.4, label=f"sign {sign:+d}")
        accuracy_ax.plot(x, ds["accuracy_top"].values[:, s], marker="o", label=f"top, {sign:+d}")
    accuracy_ax.plot(x, ds["accuracy_top_original"].values, "k.--", label="top, original")
    accuracy_ax.plot(x, ds["accuracy_baseline_original"].values, "k:", label="baseline, original")
    kl_ax.axhline(1, color="0.5", linewidth=0.8)
    kl_ax.set_yscale("log")
    kl_ax.set_ylabel("KL top / KL baseline")
    accuracy_ax.set_ylabel("accuracy")
    for ax in (kl_ax, accuracy_ax):
        ax.set_xticks(x, [str(c) for c in component])
        ax.set_xlabel("component")
        ax.legend()
    kl_ax.set_title(f"epsilon = {ds.attrs['epsilon']}")
    yield Figure(
        f"{info.id}-kl",
        caption(
            info,
            "Perturbation test: KL of the predictions on each component's top examples over "
            "the random baseline's, and the accuracy on the top examples",
        ),
        fig,
    )
