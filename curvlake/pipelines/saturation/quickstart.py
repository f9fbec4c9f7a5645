"""The quickstart's PHD-LAB step: saturation, latents, probes and receptive fields of its CNN."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from curvlake.lake import Lake
from curvlake.pipelines.saturation.compute import run_saturation
from curvlake.pipelines.saturation.latents import run_latents
from curvlake.pipelines.saturation.plot import plot_probes, plot_saturation
from curvlake.pipelines.saturation.probes_pipeline import run_probes
from curvlake.pipelines.saturation.rf_pipeline import run_receptive_field


def _figure_path(lake: Lake, name: str) -> Path:
    return Path(lake.url).parent / name if lake.local else Path(name)


def quickstart_saturation(
    lake: Lake, cnn_run_id: str, echo: Callable[[str], None] = print
) -> dict[str, str]:
    """Saturation of the CNN at its checkpoints (test split), probes of its layers (2x2
    pooled latents), its receptive fields, and the two figures next to the lake.

    Returns:
        ``{role: artifact id or figure path}``.
    """
    echo("saturation of the CNN's layers at its checkpoints (test split)")
    saturation = run_saturation(lake, cnn_run_id, split="test", progress=False)
    ds = lake.open(saturation)
    for e, epoch in enumerate(ds.epoch.values):
        values = ", ".join(f"{v:.2f}" for v in ds.saturation.values[e, 0])
        echo(f"  epoch {int(epoch):>2}: saturation per layer {values}")
    echo("latents of every layer (train and test, pooled to 2x2) and a probe per layer")
    latents = run_latents(lake, cnn_run_id, splits=("train", "test"), pool=2, progress=False)
    probes = run_probes(lake, latents, progress=False)
    accuracy = lake.open(probes).test_accuracy.values
    echo("  probe test accuracy per layer: " + ", ".join(f"{v:.3f}" for v in accuracy))
    receptive_field = run_receptive_field(lake, cnn_run_id)
    border = lake.group(receptive_field).attrs["border_layer"]
    echo(f"  receptive fields: border layer {border}")
    saturation_png = plot_saturation(
        lake, saturation, _figure_path(lake, "quickstart-saturation.png")
    )
    probes_png = plot_probes(
        lake,
        probes,
        _figure_path(lake, "quickstart-probes.png"),
        receptive_field=receptive_field,
        saturation=saturation,
    )
    return {
        "saturation": saturation,
        "latents": latents,
        "probes": probes,
        "receptive_field": receptive_field,
        "saturation per layer over epochs": str(saturation_png),
        "probe accuracy per layer": str(probes_png),
    }
