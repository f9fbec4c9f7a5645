"""Figures of the cross-method analyses (``comparison_*`` kinds, ``curvlake compare``)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from curvlake.lake import ArtifactInfo, Lake
from curvlake.report.figures import Figure, new_figure
from curvlake.report.renderers._registry import caption, renderer

#: Masks drawn as curves at most (the others still count in the sparsity panel).
_MAX_CURVES = 12


def _colors(n: int) -> list:
    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


@renderer("comparison_masks")
def masks_figure(lake: Lake, info: ArtifactInfo):
    """Overlap against k' per mask with its random baseline; overlap at k against sparsity."""
    ds = lake.open(info.id)
    overlap, baseline = ds["overlap"].values, ds["baseline"].values
    k = ds["k"].values
    labels = [str(m) for m in ds["mask"].values]
    sources = [str(s) for s in ds["mask_source"].values]
    sparsity = ds["sparsity"].values
    fig = new_figure(10, 3.6)
    curves, by_sparsity = fig.subplots(1, 2)
    shown = np.argsort(sparsity, kind="stable")[:: max(1, len(labels) // _MAX_CURVES)]
    for i, color in zip(shown, _colors(len(shown)), strict=True):
        curves.plot(k, overlap[i], color=color, label=f"{labels[i]} ({sources[i]})")
        curves.axhline(baseline[i], color=color, linestyle=":", linewidth=0.8)
    curves.set_xlabel("k' (top eigenvectors)")
    curves.set_ylabel("overlap ||U[M, :k']||² / k'")
    curves.set_ylim(0, 1.02)
    curves.legend(fontsize=5)
    curves.set_title("dotted: random mask of the same size")
    for source, color in zip(sorted(set(sources)), _colors(len(set(sources))), strict=True):
        rows = [i for i, s in enumerate(sources) if s == source]
        order = sorted(rows, key=lambda i: sparsity[i])
        by_sparsity.plot(sparsity[order], overlap[order, -1], marker="o", color=color, label=source)
    order = np.argsort(sparsity)
    by_sparsity.plot(sparsity[order], baseline[order], "k:", label="random mask")
    by_sparsity.set_xlabel("sparsity 1 - m / P")
    by_sparsity.set_ylabel(f"overlap at k = {k[-1]}")
    by_sparsity.set_ylim(0, 1.02)
    by_sparsity.legend()
    by_sparsity.set_title(f"{ds.attrs['hessian_eigs']}")
    yield Figure(
        f"{info.id}-overlap",
        caption(
            info,
            f"Overlap of {len(labels)} masks with the top-{k[-1]} Hessian eigenspace of run "
            f"{ds.attrs['run']} at checkpoint {ds.attrs['checkpoint']}, against the random "
            "baseline m / P",
        ),
        fig,
    )


@renderer("comparison_drift")
def drift_figure(lake: Lake, info: ArtifactInfo):
    """Mean cos² and distances over the pairs' epochs; the principal angles of each pair."""
    ds = lake.open(info.id)
    metric = [str(m) for m in ds["metric"].values]
    distance = ds["distance"].values
    epoch = ds["second_epoch"].values
    x = (
        epoch
        if np.all(epoch >= 0) and len(set(epoch.tolist())) == len(epoch)
        else ds["pair"].values
    )
    fig = new_figure(10, 3.4)
    similarity, angles = fig.subplots(1, 2)
    similarity.plot(x, distance[:, metric.index("mean_cos2")], marker="o", label="mean cos² θ")
    similarity.plot(x, ds["baseline_mean_cos2"].values, "k:", label="random subspace (k / P)")
    similarity.plot(
        x, distance[:, metric.index("projection_max")], marker="s", label="max sin θ (projection)"
    )
    similarity.set_xlabel("epoch of the second eigenspace" if x is epoch else "pair")
    similarity.set_ylim(0, 1.02)
    similarity.legend()
    similarity.set_title(f"{ds.attrs['mode']} pairs, k = {ds.attrs['k']}")
    for p, color in zip(range(len(x)), _colors(len(x)), strict=True):
        angles.plot(
            np.arange(1, ds.sizes["angle"] + 1),
            np.degrees(ds["angle"].values[p]),
            color=color,
            label=f"{ds['first_epoch'].values[p]} → {ds['second_epoch'].values[p]}",
        )
    angles.set_xlabel("principal angle index")
    angles.set_ylabel("angle (degrees)")
    angles.set_ylim(0, 91)
    angles.legend(title="epochs", fontsize=6)
    yield Figure(
        f"{info.id}-angles",
        caption(info, "Drift of the top-k Hessian eigenspace: principal angles between pairs"),
        fig,
    )


@renderer("comparison_examples")
def examples_figure(lake: Lake, info: ArtifactInfo):
    """Rank correlations (component x statistic); top examples' statistics against the mean."""
    ds = lake.open(info.id)
    names = [str(s) for s in ds["statistic"].values]
    component = ds["component"].values
    rho = ds["spearman"].values
    fig = new_figure(4 + 1.1 * len(names), 0.6 + 0.35 * len(component) + 1.4)
    heat, side = fig.subplots(1, 2, width_ratios=[max(len(names), 2), max(len(names), 2)])
    image = heat.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for (j, s), value in np.ndenumerate(rho):
        heat.text(
            s, j, "" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=6
        )
    heat.set_xticks(range(len(names)), names, rotation=30, ha="right")
    heat.set_yticks(range(len(component)), [f"component {c}" for c in component])
    heat.set_title("Spearman ρ of W[:, j] with the statistic")
    fig.colorbar(image, ax=heat, shrink=0.8)
    # each statistic of the top examples relative to its mean over all examples
    mean = ds["mean_value"].values
    ratio = ds["top_value"].values / np.where(mean == 0, np.nan, mean)
    for s, color in zip(range(len(names)), _colors(len(names)), strict=True):
        for j in range(len(component)):
            side.scatter(
                np.full(ratio.shape[1], s) + (j - len(component) / 2) * 0.6 / len(component),
                ratio[j, :, s],
                s=6,
                color=color,
            )
    side.axhline(1, color="0.4", linestyle=":")
    side.set_xticks(range(len(names)), names, rotation=30, ha="right")
    side.set_yscale("log")
    side.set_ylabel("top examples' value / mean over all")
    side.set_title(f"top {ds.sizes['top']} examples of each component")
    yield Figure(
        f"{info.id}-correlations",
        caption(
            info,
            f"NPEFF components of {ds.attrs['npeff']} against per-example statistics of the same "
            f"{ds.attrs['n_examples']} examples",
        ),
        fig,
    )


@renderer("comparison_layers")
def layers_figure(lake: Lake, info: ArtifactInfo):
    """Saturation, probe accuracy and receptive field per layer on one axis, per epoch."""
    ds = lake.open(info.id)
    layers = [str(n) for n in ds["layer"].values]
    epochs = ds["epoch"].values
    x = np.arange(len(layers))
    fig = new_figure(max(6, 0.35 * len(layers) + 2), 6.5)
    sat_ax, probe_ax, rf_ax = fig.subplots(3, 1, sharex=True)
    for e, color in zip(range(len(epochs)), _colors(len(epochs)), strict=True):
        sat_ax.plot(x, ds["saturation"].values[e], marker=".", color=color, label=str(epochs[e]))
        probe_ax.plot(x, ds["probe_accuracy"].values[e], marker=".", color=color)
    size = ds["input_size"].values.astype(np.float64)
    if size.size:
        relative = np.min(ds["receptive_field_min"].values / size, axis=1)
        rf_ax.semilogy(x, np.where(np.isfinite(relative), relative, np.nan), "o-", label="min")
        rf_ax.semilogy(
            x, np.min(ds["receptive_field_max"].values / size, axis=1), "s--", label="max"
        )
        rf_ax.axhline(1, color="0.4", linestyle=":")
        rf_ax.legend()
    border = ds.attrs.get("border_layer")
    for ax in (sat_ax, probe_ax, rf_ax):
        if border in layers:
            ax.axvline(layers.index(border), color="tab:red", linewidth=1)
    sat_ax.set_ylabel("saturation")
    probe_ax.set_ylabel("probe accuracy")
    rf_ax.set_ylabel("receptive field / input")
    rf_ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=6)
    if len(epochs):
        sat_ax.legend(title="epoch", fontsize=6, ncols=2)
    sat_ax.set_title(f"run {ds.attrs['run']}; red: border layer {border}")
    yield Figure(
        f"{info.id}-layers",
        caption(
            info,
            "Saturation, probe accuracy and receptive field (relative to the input) per layer, "
            "per epoch; the red line is the border layer",
        ),
        fig,
    )
