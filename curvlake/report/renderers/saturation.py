"""Figures of the PHD-LAB kinds: ``saturation``, ``saturation_projection``, ``probes``,
``receptive_field``."""

from __future__ import annotations

import numpy as np

from curvlake.lake import ArtifactInfo, Lake
from curvlake.report.figures import Figure, new_figure
from curvlake.report.renderers._registry import caption, renderer


def _layer_axis(ax, layers: list[str]) -> None:
    ax.set_xticks(np.arange(len(layers)), layers, rotation=60, ha="right", fontsize=6)


@renderer("saturation")
def saturation_figure(lake: Lake, info: ArtifactInfo):
    """Saturation per layer (columns) and epoch (rows), one panel per phase."""
    ds = lake.open(info.id)
    layers = [str(n) for n in ds["layer"].values]
    phases = [str(p) for p in ds["phase"].values]
    epochs = ds["epoch"].values
    fig = new_figure(max(5, 0.3 * len(layers) + 2) * len(phases), 1.2 + 0.22 * len(epochs) + 1)
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    for ax, p, phase in zip(axes, range(len(phases)), phases, strict=True):
        image = ax.imshow(
            ds["saturation"].values[:, p, :],
            aspect="auto",
            vmin=0,
            vmax=1,
            cmap="magma",
            interpolation="nearest",
        )
        _layer_axis(ax, layers)
        ax.set_yticks(np.arange(len(epochs)), [str(e) for e in epochs], fontsize=6)
        ax.set_ylabel("epoch")
        ax.set_title(f"{phase} phase")
    fig.colorbar(image, ax=list(axes), label="saturation k / d")
    yield Figure(
        f"{info.id}-layers",
        caption(
            info,
            f"Saturation per layer over epochs (delta = {ds.attrs['delta']}, "
            f"{ds.attrs['rule']} rule)",
        ),
        fig,
    )


@renderer("saturation_projection")
def projection_figure(lake: Lake, info: ArtifactInfo):
    """Accuracy and mean saturation of the projected model against delta."""
    ds = lake.open(info.id)
    delta = ds["delta"].values
    shown = delta < 1  # delta >= 1 keeps everything: drawn as the unchanged model's line
    fig = new_figure(9, 3)
    accuracy_ax, sat_ax = fig.subplots(1, 2)
    accuracy_ax.plot(delta[shown], ds["accuracy"].values[shown], marker="o", label="eigenspace")
    if "random_accuracy" in ds:
        accuracy_ax.plot(
            delta[shown], ds["random_accuracy"].values[shown], marker="s", label="random"
        )
    if (~shown).any():
        accuracy_ax.axhline(
            ds["accuracy"].values[~shown][0], color="0.4", linestyle=":", label="unprojected"
        )
    accuracy_ax.set_xlabel("delta")
    accuracy_ax.set_ylabel(f"{ds.attrs['split']} accuracy")
    accuracy_ax.legend()
    sat_ax.plot(delta[shown], ds["saturation"].values[shown].mean(axis=1), marker="o")
    sat_ax.set_xlabel("delta")
    sat_ax.set_ylabel("mean saturation over layers")
    yield Figure(
        f"{info.id}-delta",
        caption(info, "Accuracy of the model projected onto its delta eigenspaces"),
        fig,
    )


def _border_for(lake: Lake, info: ArtifactInfo) -> tuple[str | None, str | None]:
    """A receptive_field artifact of the probes' run (by lineage) and its border layer."""
    from curvlake.pipelines.compare._inputs import lineage_run

    run = lineage_run(lake, info.id)
    if run is None:
        return None, None
    for rf in lake.list("receptive_field"):
        if rf.status == "complete" and lineage_run(lake, rf.id) == run:
            return rf.id, lake.group(rf.id).attrs.get("border_layer")
    return None, None


@renderer("probes")
def probes_figure(lake: Lake, info: ArtifactInfo):
    """Probe accuracy per layer on each split, with the border layer when it is known."""
    group = lake.group(info.id)
    layers = [str(n) for n in group["layer"][:]]
    fig = new_figure(max(5, 0.3 * len(layers) + 2), 3.2)
    ax = fig.subplots()
    for split in ("train", "val", "test"):
        values = np.asarray(group[f"{split}_accuracy"][:])
        if np.isfinite(values).any():
            ax.plot(np.arange(len(layers)), values, marker="o", label=split)
    rf_id, border = _border_for(lake, info)
    if border in layers:
        ax.axvline(layers.index(border), color="tab:red", label=f"border layer ({rf_id})")
    _layer_axis(ax, layers)
    ax.set_ylabel("probe accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    yield Figure(
        f"{info.id}-accuracy",
        caption(
            info, "Linear-probe accuracy per layer" + (", and the border layer" if border else "")
        ),
        fig,
    )


@renderer("receptive_field")
def receptive_field_figure(lake: Lake, info: ArtifactInfo):
    """Minimum and maximum receptive field per layer against the input size."""
    ds = lake.open(info.id)
    layers = [str(n) for n in ds["layer"].values]
    size = np.asarray(ds.attrs["input_size"], dtype=np.float64)
    fig = new_figure(max(5, 0.3 * len(layers) + 2), 3.2)
    ax = fig.subplots()
    x = np.arange(len(layers))
    for name, style in (("r_min", "o-"), ("r_max", "s--")):
        values = ds[name].values.min(axis=1)
        ax.semilogy(x, np.where(np.isfinite(values), values, np.nan), style, label=name)
    ax.axhline(size.max(), color="0.4", linestyle=":", label=f"input {size.astype(int).tolist()}")
    border = ds.attrs.get("border_layer")
    if border in layers:
        ax.axvline(layers.index(border), color="tab:red", label=f"border layer {border}")
    _layer_axis(ax, layers)
    ax.set_ylabel("receptive field (pixels, smallest axis)")
    ax.legend()
    yield Figure(
        f"{info.id}-layers",
        caption(info, "Receptive field per layer and the border layer (global layers omitted)"),
        fig,
    )
