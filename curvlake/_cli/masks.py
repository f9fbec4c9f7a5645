"""``curvlake mask``: parameter masks (sets of coordinates of θ) from magnitudes or files."""

from __future__ import annotations

import click

from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_option,
    pass_settings,
    run_option,
)
from curvlake.constants import MASK_SCOPES


@click.group(cls=CurvlakeGroup)
def mask():
    """Parameter masks: largest magnitudes, imported files, counts per layer."""


@mask.command("magnitude")
@run_option()
@checkpoint_option()
@click.option("--size", type=click.IntRange(min=0), help="Number of coordinates kept.")
@click.option(
    "--fraction", type=click.FloatRange(0, 1), help="Share of the selected coordinates kept."
)
@click.option(
    "--scope",
    type=click.Choice(MASK_SCOPES),
    default="global",
    show_default=True,
    help="global: top-m over all selected tensors; layer: each tensor keeps its share.",
)
@click.option("--layers", help="Regular expression selecting tensors by name (default: all).")
@pass_settings
def mask_magnitude(settings: Settings, run_id, checkpoint, size, fraction, scope, layers):
    """Mask of the largest |theta_j| of a run's checkpoint (give --size or --fraction)."""
    from curvlake.pipelines.masks import run_magnitude_mask

    mask_id = run_magnitude_mask(
        settings.lake(),
        run_id,
        checkpoint=checkpoint,
        size=size,
        fraction=fraction,
        scope=scope,
        layers=layers,
    )
    click.echo(mask_id)


@mask.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@run_option()
@pass_settings
def mask_import(settings: Settings, path, run_id):
    """Store PATH as a mask of a run's parameters: a .npy bool vector (one entry per parameter)
    or int index vector, or a .pt dict of tensor name -> bool tensor (prune '<name>_mask'
    keys accepted)."""
    from curvlake.pipelines.masks import import_mask

    click.echo(import_mask(settings.lake(), path, run_id))


@mask.command("show")
@click.argument("mask_id")
@pass_settings
def mask_show(settings: Settings, mask_id):
    """Print a mask's source and its coordinates per tensor."""
    from curvlake.pipelines.masks import load_mask

    lake_ = settings.lake()
    loaded = load_mask(lake_, mask_id)
    group = lake_.group(mask_id)
    details = ", ".join(
        f"{key}={group.attrs.get(key)}"
        for key in ("source", "scope", "run", "checkpoint")
        if group.attrs.get(key) is not None
    )
    click.echo(
        f"{mask_id}: {len(loaded)} of {loaded.table.total} parameters "
        f"({loaded.density:.2%}); {details}"
    )
    names = loaded.table.names
    shapes = [",".join(map(str, s)) or "scalar" for s in loaded.table.shapes]
    rows = [
        (name, shape, str(count), str(size), f"{count / size:.2%}" if size else "-")
        for name, shape, count, size in zip(
            names, shapes, loaded.count_per_layer(), loaded.table.sizes, strict=True
        )
    ]
    header = ("TENSOR", "SHAPE", "IN MASK", "SIZE", "SHARE")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
