"""``curvlake latents``: per-layer features of a checkpoint over whole splits (probe inputs)."""

from __future__ import annotations

import click

from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_option,
    dtype_option,
    n_examples_option,
    pass_settings,
    run_option,
)
from curvlake.errors import UserInputError


@click.group(cls=CurvlakeGroup)
def latents():
    """Latent representations: every feature layer's output, in eval mode, fixed order."""


@latents.command("extract")
@run_option()
@checkpoint_option()
@click.option(
    "--split",
    "splits",
    default="train,test",
    show_default=True,
    help="Comma-separated splits (train, val, test).",
)
@click.option(
    "--pool",
    type=click.IntRange(min=1),
    help="Average-pool conv maps to D x D (default 4, phd-lab's); not with --pixelwise.",
)
@click.option("--pixelwise", is_flag=True, help="Keep conv maps unpooled.")
@click.option("--layers", help="Regular expression selecting the feature layers (default: all).")
@n_examples_option()
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    help="Examples per task and stored chunk (default: as many as fit 32 MiB).",
)
@click.option(
    "--compress",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="zstd-compress the features (auto: when a sample shrinks below 85%).",
)
@dtype_option()
@pass_settings
def latents_extract(
    settings: Settings,
    run_id,
    checkpoint,
    splits,
    pool,
    pixelwise,
    layers,
    n_examples,
    block_size,
    compress,
    dtype,
):
    """Extract the latents of --run at --checkpoint into a latents artifact."""
    from curvlake.pipelines.saturation.latents import run_latents

    if pixelwise and pool is not None:
        raise UserInputError("--pool does not apply with --pixelwise (conv maps are kept whole)")
    names = [s.strip() for s in splits.split(",") if s.strip()]
    lake_ = settings.lake()
    with settings.cluster_session():
        latents_id = run_latents(
            lake_,
            run_id,
            checkpoint=checkpoint,
            splits=names,
            pool=pool,
            pixelwise=pixelwise,
            layers=layers,
            n_examples=n_examples,
            block_size=block_size,
            dtype=dtype,
            compress={"auto": "auto", "yes": True, "no": False}[compress],
        )
    print_latents(lake_, latents_id)


def print_latents(lake_, latents_id: str) -> None:
    group = lake_.group(latents_id)
    click.echo(latents_id)
    sizes = ", ".join(
        f"{split} {group[f'{split}_features'].shape[0]}" for split in group.attrs["splits"]
    )
    click.echo(f"  examples: {sizes}; compressed: {group.attrs.get('compressed')}")
    for name, shape in zip(group["layer"][:], group["layer_shape"][:], strict=True):
        click.echo(f"  {name}: {shape}")
