"""Figures: saturation per layer over epochs, and probe accuracy per layer with the border layer.

``saturation plot`` draws one panel per phase (``train``, ``eval``): saturation against the
layers in module order, one line per epoch coloured from early (dark) to late (light), as
delve's plots and Richter et al. (2021) show them. ``probes plot`` draws train / val / test
probe accuracy per layer; with a ``receptive_field`` artifact the border layer is marked (the
first layer whose receptive field covers the input: Richter et al. 2021, "(Input) size
matters"), and with a ``saturation`` artifact the layers' saturation is drawn beside, on its
own axis.
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

#: Figure formats the plot commands write.
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def saturation_figure(lake: Lake, saturation_id: str) -> Figure:
    """The figure of ``saturation plot`` (see the module docstring)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    require_artifact(lake, saturation_id, "saturation", role="saturation artifact")
    ds = lake.open(saturation_id)
    layers = [str(n) for n in ds.layer.values]
    epochs = ds.epoch.values
    values = ds.saturation.values
    phases = [str(p) for p in ds.phase.values]
    width = max(6.0, 0.35 * len(layers) + 2)
    figure = Figure(figsize=(width * len(phases), 4.2), layout="constrained")
    axes = figure.subplots(1, len(phases), squeeze=False, sharey=True)[0]
    norm = Normalize(vmin=float(epochs.min()), vmax=float(max(epochs.max(), epochs.min() + 1)))
    cmap = colormaps["viridis"]
    x = np.arange(len(layers))
    for p, (ax, phase) in enumerate(zip(axes, phases, strict=True)):
        for e, epoch in enumerate(epochs):
            ax.plot(x, values[e, p], color=cmap(norm(epoch)), marker="o", markersize=3, lw=1)
        ax.set_xticks(x, layers, rotation=70, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        split = ds.attrs.get("eval_split")
        ax.set_title(f"{phase}" + (f" ({split})" if phase == "eval" and split else ""))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"saturation (delta={ds.attrs['delta']:g}, {ds.attrs['rule']})")
    figure.colorbar(ScalarMappable(norm, cmap), ax=list(axes), label="epoch")
    figure.suptitle(f"saturation per layer, {saturation_id}", fontsize=9)
    return figure


def plot_saturation(lake: Lake, saturation_id: str, path: str | Path) -> Path:
    """Write the saturation figure to ``path`` (.png, .pdf, .svg)."""
    path = output_path(path, FIGURE_SUFFIXES)
    saturation_figure(lake, saturation_id).savefig(path, dpi=120)
    return path


def border_index(layers: list[str], rf_layers: list[str], border: str | None) -> int | None:
    """Index among ``layers`` of the border layer (or of the first probed layer after it)."""
    if border is None or border not in rf_layers:
        return None
    order = {name: i for i, name in enumerate(rf_layers)}
    at = order[border]
    for i, name in enumerate(layers):
        if name in order and order[name] >= at:
            return i
    return None


def probes_figure(
    lake: Lake,
    probes_id: str,
    *,
    receptive_field: str | None = None,
    saturation: str | None = None,
    epoch: int = -1,
) -> Figure:
    """The figure of ``probes plot`` (see the module docstring)."""
    from matplotlib.figure import Figure

    require_artifact(lake, probes_id, "probes", role="probes artifact")
    ds = lake.open(probes_id)
    layers = [str(n) for n in ds.layer.values]
    x = np.arange(len(layers))
    figure = Figure(figsize=(max(6.0, 0.4 * len(layers) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    for name, style in (("train", "-o"), ("val", "--s"), ("test", "-^")):
        values = ds[f"{name}_accuracy"].values
        if np.isfinite(values).any():
            ax.plot(x, values, style, markersize=4, lw=1.2, label=f"{name} accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probe accuracy")
    ax.set_xticks(x, layers, rotation=70, ha="right", fontsize=7)
    ax.grid(alpha=0.3)
    title = f"probes per layer, {probes_id}"
    if receptive_field is not None:
        require_artifact(lake, receptive_field, "receptive_field", role="receptive_field")
        rf = lake.open(receptive_field)
        border = rf.attrs.get("border_layer")
        at = border_index(layers, [str(n) for n in rf.layer.values], border)
        if at is not None:
            ax.axvline(at, color="tab:red", ls=":", lw=1.5, label=f"border layer ({border})")
        else:
            title += f"; border layer: {border or 'none'}"
    if saturation is not None:
        require_artifact(lake, saturation, "saturation", role="saturation artifact")
        sat = lake.open(saturation)
        n = sat.sizes["epoch"]
        check("epoch", epoch, Interval(int, -n, n - 1), context=f"{saturation} has {n} epochs")
        phase = "eval" if "eval" in list(sat.phase.values) else str(sat.phase.values[0])
        row = sat.saturation.sel(phase=phase).isel(epoch=epoch)
        by_name = dict(zip([str(n) for n in sat.layer.values], row.values, strict=True))
        values = np.array([by_name.get(name, np.nan) for name in layers])
        if not np.isfinite(values).any():
            raise UserInputError(
                f"saturation artifact {saturation} has none of the probed layers "
                f"({', '.join(layers[:4])}...)"
            )
        twin = ax.twinx()
        twin.bar(x, values, width=0.6, color="tab:gray", alpha=0.3, label="saturation")
        twin.set_ylim(0, 1.02)
        twin.set_ylabel(f"{phase} saturation, epoch {int(sat.epoch.values[epoch])}")
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        handles, labels = ax.get_legend_handles_labels()
        more, more_labels = twin.get_legend_handles_labels()
        ax.legend(handles + more, labels + more_labels, fontsize=8, loc="lower right")
    else:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    return figure


def plot_probes(
    lake: Lake,
    probes_id: str,
    path: str | Path,
    *,
    receptive_field: str | None = None,
    saturation: str | None = None,
    epoch: int = -1,
) -> Path:
    """Write the probes figure to ``path`` (.png, .pdf, .svg)."""
    path = output_path(path, FIGURE_SUFFIXES)
    figure = probes_figure(
        lake, probes_id, receptive_field=receptive_field, saturation=saturation, epoch=epoch
    )
    figure.savefig(path, dpi=120)
    return path
