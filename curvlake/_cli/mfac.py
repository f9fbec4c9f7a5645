"""``curvlake mfac``: gradient windows for M-FAC inverse-Fisher products."""

from __future__ import annotations

import click

from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_option,
    dtype_option,
    pass_settings,
    run_option,
    split_option,
)
from curvlake.constants import GRAD_ORDERS


@click.group(cls=CurvlakeGroup)
def mfac():
    """M-FAC: gradient windows whose inverse Fisher F = damp*I + G^T G / m is applied
    matrix-free (python: curvlake.pipelines.mfac.InverseFisher.from_lake)."""


@mfac.command("grads")
@run_option()
@checkpoint_option()
@split_option()
@click.option("--n-grads", type=int, required=True, help="Number of gradients m (>= 1).")
@click.option(
    "--batch-size",
    type=int,
    default=1,
    show_default=True,
    help="Examples averaged into each gradient (1: per-example gradients).",
)
@click.option(
    "--order",
    type=click.Choice(GRAD_ORDERS),
    default="sequential",
    show_default=True,
    help="sequential: the split in order (m x batch examples at most); shuffled: a new "
    "permutation per pass over the split.",
)
@click.option("--seed", type=int, help="Seed of the shuffled order (default 0).")
@click.option("--mask", "mask_id", help="A mask artifact of the run: only its coordinates.")
@click.option(
    "--block-size",
    type=int,
    default=64,
    show_default=True,
    help="Gradients per task (a killed run resumes by these blocks).",
)
@click.option("--param-chunk", type=int, help="Parameter columns per stored chunk.")
@dtype_option()
@pass_settings
def mfac_grads(
    settings: Settings,
    run_id,
    checkpoint,
    split,
    n_grads,
    batch_size,
    order,
    seed,
    mask_id,
    block_size,
    param_chunk,
    dtype,
):
    """Store m loss gradients of a checkpoint as a grad_window artifact."""
    from curvlake.pipelines.mfac.grads import run_grad_window

    lake_ = settings.lake()
    with settings.cluster_session():
        window_id = run_grad_window(
            lake_,
            run_id,
            n_grads=n_grads,
            batch_size=batch_size,
            checkpoint=checkpoint,
            split=split,
            order=order,
            seed=seed,
            mask=mask_id,
            block_size=block_size,
            param_chunk=param_chunk,
            dtype=dtype,
        )
    ds = lake_.open(window_id)
    m, d = ds["gradient"].shape
    click.echo(
        f"{window_id}  {m} gradients of {ds.attrs['batch_size']} example(s) x {d} parameters "
        f"({ds.attrs['selection']}), run {ds.attrs['run']} checkpoint {ds.attrs['checkpoint']}"
    )
