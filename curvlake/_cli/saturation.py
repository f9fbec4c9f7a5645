"""``curvlake saturation``: layer saturation of checkpoints, PCA projections, plots, imports."""

from __future__ import annotations

from pathlib import Path

import click

from curvlake._cli._given import given
from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_list,
    checkpoint_option,
    checkpoints_option,
    dtype_option,
    n_examples_option,
    out_option,
    pass_settings,
    run_option,
)
from curvlake.constants import CONV_METHODS, SATURATION_RULES, SPLITS
from curvlake.validation import refuse_unused


@click.group(cls=CurvlakeGroup)
def saturation():
    """Saturation of layers (PHD-LAB / delve): spectra of layer outputs, PCA projections."""


def _delta_option(default: float = 0.99):
    return click.option(
        "--delta",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help="Explained-variance threshold of the intrinsic dimension (>= 1: every dimension).",
    )


def rule_option():
    return click.option(
        "--rule",
        type=click.Choice(SATURATION_RULES),
        default="textbook",
        show_default=True,
        help="textbook: min k with p_k >= delta; delve: delve 0.1.50's numbers (k - 1).",
    )


def conv_method_option():
    return click.option(
        "--conv-method",
        type=click.Choice(CONV_METHODS),
        default="channelwise",
        show_default=True,
        help="Conv outputs as observations: every position (channelwise), pooled, or flat.",
    )


def layers_option():
    return click.option(
        "--layers", help="Regular expression selecting the feature layers (default: all)."
    )


def _split_choice(name: str, default: str, what: str):
    return click.option(
        name, type=click.Choice(SPLITS), default=default, show_default=True, help=what
    )


@saturation.command("compute")
@run_option()
@checkpoints_option()
@_split_choice("--split", "test", "Split whose outputs are measured (in eval mode).")
@_delta_option()
@rule_option()
@click.option(
    "--ddof",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="The covariance divides by n - ddof (delve: 0).",
)
@conv_method_option()
@layers_option()
@n_examples_option()
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    help="Examples per task (default: the run's eval batch size, as in training).",
)
@dtype_option()
@pass_settings
def saturation_compute(
    settings: Settings,
    run_id,
    checkpoints,
    split,
    delta,
    rule,
    ddof,
    conv_method,
    layers,
    n_examples,
    block_size,
    dtype,
):
    """Saturation of every feature layer at the run's checkpoints."""
    from curvlake.pipelines.saturation.compute import run_saturation

    lake_ = settings.lake()
    with settings.cluster_session():
        saturation_id = run_saturation(
            lake_,
            run_id,
            checkpoints=checkpoint_list(checkpoints),
            split=split,
            delta=delta,
            rule=rule,
            ddof=ddof,
            conv_method=conv_method,
            layers=layers,
            n_examples=n_examples,
            block_size=block_size,
            dtype=dtype,
        )
    click.echo(saturation_id)
    print_saturation(lake_, saturation_id)


def print_saturation(lake_, saturation_id: str) -> None:
    ds = lake_.open(saturation_id)
    layers = [str(n) for n in ds.layer.values]
    values = ds.saturation.values
    click.echo("  epoch phase  " + "  ".join(f"{name[-12:]:>12}" for name in layers))
    for e, epoch in enumerate(ds.epoch.values):
        for p, phase in enumerate(ds.phase.values):
            row = "  ".join(f"{v:>12.3f}" for v in values[e, p])
            click.echo(f"  {int(epoch):>5} {phase:<6} {row}")


@saturation.command("project")
@run_option()
@checkpoint_option()
@click.option(
    "--deltas",
    default="0.9,0.95,0.99,0.999,3",
    show_default=True,
    help="Comma-separated thresholds (>= 1: the unchanged layer).",
)
@click.option("--random", "random_", is_flag=True, help="Also random projections of equal rank.")
@click.option(
    "--seed", type=click.IntRange(min=0), help="--random: seed of the projections (default 0)."
)
@_split_choice("--fit-split", "train", "Split whose outputs give the eigenspaces.")
@_split_choice("--split", "test", "Split evaluated.")
@rule_option()
@conv_method_option()
@layers_option()
@n_examples_option()
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    help="Examples per task (default: the run's eval batch size).",
)
@dtype_option()
@pass_settings
def saturation_project(
    settings: Settings,
    run_id,
    checkpoint,
    deltas,
    random_,
    seed,
    fit_split,
    split,
    rule,
    conv_method,
    layers,
    n_examples,
    block_size,
    dtype,
):
    """Test loss and accuracy with every layer projected onto its delta eigenspace."""
    from curvlake.pipelines.saturation.project import run_saturation_project

    try:
        values = [float(v) for v in deltas.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{deltas!r} is not a list of numbers", param_hint="--deltas"
        ) from None
    lake_ = settings.lake()
    with settings.cluster_session():
        projection_id = run_saturation_project(
            lake_,
            run_id,
            checkpoint=checkpoint,
            deltas=values,
            random=random_,
            seed=seed,
            fit_split=fit_split,
            split=split,
            rule=rule,
            conv_method=conv_method,
            layers=layers,
            n_examples=n_examples,
            block_size=block_size,
            dtype=dtype,
        )
    ds = lake_.open(projection_id)
    click.echo(projection_id)
    random_cols = "random_accuracy" in ds
    header = f"  {'delta':>8} {'mean sat':>9} {'loss':>8} {'accuracy':>9}"
    click.echo(header + (f" {'random loss':>12} {'random acc':>11}" if random_cols else ""))
    for i, delta in enumerate(ds.delta.values):
        line = (
            f"  {delta:>8g} {float(ds.saturation.values[i].mean()):>9.3f} "
            f"{float(ds.loss[i]):>8.4f} {float(ds.accuracy[i]):>9.4f}"
        )
        if random_cols:
            line += f" {float(ds.random_loss[i]):>12.4f} {float(ds.random_accuracy[i]):>11.4f}"
        click.echo(line)


@saturation.command("plot")
@click.argument("saturation_id", required=False)
@run_option(required=False)
@out_option("PNG path (default: ID.png).")
@pass_settings
def saturation_plot(settings: Settings, saturation_id, run_id, out):
    """Saturation per layer over epochs (train and eval) of SATURATION_ID, or of the
    saturation tracked while training --run."""
    from curvlake.pipelines.saturation.plot import plot_saturation
    from curvlake.pipelines.saturation.tracking import training_saturation_id
    from curvlake.validation import check_exclusive

    check_exclusive(SATURATION_ID=saturation_id, run=run_id)
    lake_ = settings.lake()
    if run_id is not None:
        saturation_id = training_saturation_id(lake_, run_id)
    path = plot_saturation(lake_, saturation_id, out or f"{saturation_id}.png")
    click.echo(f"wrote {path}")


@saturation.command("import")
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--delta",
    type=click.FloatRange(min=0, min_open=True),
    help="Per-epoch log: the delta it was computed with (default 0.99).",
)
@click.option(
    "--rule",
    type=click.Choice(SATURATION_RULES),
    help="Per-epoch log: the rule (default delve, which computed it).",
)
@click.option(
    "--layers",
    help="Latent folder: comma-separated layer names in module order (default: natural order).",
)
@click.option(
    "--order-like", help="Probe CSV: an artifact whose layer order the rows take (saturation...)."
)
@click.option("--num-classes", type=click.IntRange(min=2), help="Latents / probes: classes.")
@pass_settings
def saturation_import(settings: Settings, source, delta, rule, layers, order_like, num_classes):
    """Import phd-lab outputs: a per-epoch CSV log (saturation), a latent_datasets/<run>
    folder of pickle streams (latents) or a *_probe_performances.csv (probes)."""
    from curvlake.pipelines.saturation import import_phdlab

    path = Path(source)
    lake_ = settings.lake(create=True)
    if path.is_dir():
        refuse_unused("to a latent folder", **given("delta", "rule", "order_like"))
        artifact = import_phdlab.import_phdlab_latents(
            lake_,
            path,
            layers=[n.strip() for n in layers.split(",")] if layers else None,
            num_classes=num_classes,
        )
    elif _is_probe_csv(path):
        refuse_unused("to a probe CSV", **given("delta", "rule", "layers"))
        artifact = import_phdlab.import_phdlab_probes(
            lake_, path, order_like=order_like, num_classes=num_classes
        )
    else:
        refuse_unused("to a per-epoch log", **given("layers", "order_like", "num_classes"))
        artifact = import_phdlab.import_phdlab_saturation(
            lake_, path, delta=0.99 if delta is None else delta, rule=rule or "delve"
        )
    info = lake_.info(artifact)
    click.echo(f"{artifact}  {info.kind} imported from {path}")


def _is_probe_csv(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip().split(";")
    return "name" in header and "train_acc" in header
