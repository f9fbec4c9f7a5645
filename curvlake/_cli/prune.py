"""``curvlake prune``: one-shot and gradual pruning (M-FAC OBS vs magnitude) and its plot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_option,
    dtype_option,
    out_option,
    pass_settings,
    run_option,
)
from curvlake.constants import GRAD_ORDERS, MASK_SCOPES, OBS_UPDATES, PRUNE_METHODS, SPLITS


@click.group(cls=CurvlakeGroup)
def prune():
    """Prune a run's checkpoint: M-FAC (Optimal Brain Surgeon with the inverse Fisher of a
    gradient window) or magnitude, one-shot or gradual, and plot accuracy against sparsity."""


def _sparsities(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of numbers", param_hint="--sparsity"
        ) from None


def _pruning_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options oneshot and gradual share (M-FAC ones default to None: refused with
    --method magnitude, and filled in by the pipeline otherwise)."""
    options = [
        run_option(),
        checkpoint_option(),
        click.option(
            "--method",
            type=click.Choice(PRUNE_METHODS),
            default="mfac",
            show_default=True,
            help="mfac: OBS scores w^2 / (2 [F^-1]_qq) and weight updates (with the magnitude "
            "baseline beside it); magnitude: smallest |w|.",
        ),
        click.option(
            "--sparsity",
            "sparsities",
            default="0.5,0.7,0.9",
            show_default=True,
            help="Comma-separated sparsities of the pruned tensors, in (0, 1).",
        ),
        click.option(
            "--scope",
            type=click.Choice(MASK_SCOPES),
            default="global",
            show_default=True,
            help="global: one ranking over all pruned tensors; layer: each tensor pruned alike.",
        ),
        click.option(
            "--layers",
            help="Regular expression of the tensors to prune (default: every tensor with 2+ "
            "dimensions, i.e. conv and linear weights incl. downsample convs; no biases, norms).",
        ),
        click.option("--n-grads", type=int, help="M-FAC: gradients per window (default 256)."),
        click.option("--batch-size", type=int, help="M-FAC: examples per gradient (default 8)."),
        click.option("--damp", type=float, help="M-FAC: dampening lambda (default 1e-5)."),
        click.option(
            "--block-size",
            type=int,
            help="M-FAC: block-diagonal Fisher over blocks of B weights (default: full).",
        ),
        click.option(
            "--recompute",
            type=int,
            help="M-FAC: geometric pruning steps per level, each with a new window (default 1).",
        ),
        click.option(
            "--update",
            type=click.Choice(OBS_UPDATES),
            help="M-FAC: summed single-weight OBS updates (default) or exact group OBS.",
        ),
        click.option(
            "--split",
            "--data",
            "split",
            type=click.Choice(SPLITS),
            help="M-FAC: split of the gradients' examples (default train).",
        ),
        click.option(
            "--order",
            type=click.Choice(GRAD_ORDERS),
            help="M-FAC: order of the gradients' examples (default shuffled).",
        ),
        click.option("--seed", type=int, help="M-FAC: seed of the shuffled order (default 0)."),
        dtype_option(),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _echo_table(lake_, pruning_id: str) -> None:
    from curvlake.pipelines.mfac.plot import pruning_table

    table = pruning_table(lake_, pruning_id)
    baseline = "baseline_accuracy" in table["rows"][0]
    gradual = "pruned_accuracy" in table["rows"][0]
    name = "M-FAC" if table["method"] == "mfac" else "magnitude"
    header = ["SPARSITY", f"{name} ACC", f"{name} LOSS"]
    if gradual:
        header.append("BEFORE FINE-TUNE")
    if baseline:
        header += ["MAGNITUDE ACC", "MAGNITUDE LOSS"]
    rows = []
    for row in table["rows"]:
        cells = [f"{row['sparsity']:.0%}", f"{row['accuracy']:.4f}", f"{row['loss']:.4f}"]
        if gradual:
            cells.append(f"{row['pruned_accuracy']:.4f}")
        if baseline:
            cells += [f"{row['baseline_accuracy']:.4f}", f"{row['baseline_loss']:.4f}"]
        rows.append(cells)
    click.echo(
        f"{pruning_id}  {table['mode']} {name}; dense test accuracy "
        f"{table['dense_accuracy']:.4f}, loss {table['dense_loss']:.4f}"
    )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for cells in [header, *rows]:
        click.echo("  ".join(v.rjust(w) for v, w in zip(cells, widths, strict=True)))


@prune.command("oneshot")
@_pruning_options
@pass_settings
def prune_oneshot(settings: Settings, run_id, checkpoint, sparsities, **options):
    """Prune a checkpoint to each sparsity (each level from the checkpoint)."""
    from curvlake.pipelines.mfac.prune import run_prune_oneshot

    lake_ = settings.lake()
    with settings.cluster_session():
        pruning_id = run_prune_oneshot(
            lake_, run_id, checkpoint=checkpoint, sparsities=_sparsities(sparsities), **options
        )
    _echo_table(lake_, pruning_id)


@prune.command("gradual")
@_pruning_options
@click.option(
    "--finetune-epochs",
    type=int,
    default=1,
    show_default=True,
    help="Epochs of SGD after each level (pruned weights held at zero).",
)
@click.option(
    "--finetune-lr", type=float, default=0.01, show_default=True, help="Fine-tuning learning rate."
)
@click.option(
    "--finetune-batch-size", type=int, help="Fine-tuning batch size (default: the run's)."
)
@pass_settings
def prune_gradual(settings: Settings, run_id, checkpoint, sparsities, **options):
    """Prune to increasing sparsities in turn, fine-tuning after each."""
    from curvlake.pipelines.mfac.prune import run_prune_gradual

    lake_ = settings.lake()
    with settings.cluster_session():
        pruning_id = run_prune_gradual(
            lake_, run_id, checkpoint=checkpoint, sparsities=_sparsities(sparsities), **options
        )
    _echo_table(lake_, pruning_id)


@prune.command("plot")
@click.argument("pruning_id")
@out_option("PNG (or .pdf/.svg) file to write (default: <pruning id>.png).")
@pass_settings
def prune_plot(settings: Settings, pruning_id, out):
    """Draw test accuracy against sparsity (and the magnitude baseline) of a pruning."""
    from curvlake.pipelines.mfac.plot import plot_pruning

    path = plot_pruning(settings.lake(), pruning_id, out or f"{pruning_id}.png")
    click.echo(str(path))
