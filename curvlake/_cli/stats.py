"""``curvlake stats``: per-example statistics (input-Jacobian norms, confidence, loss)."""

from __future__ import annotations

import click

from curvlake._cli._given import given
from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    block_size_option,
    checkpoint_list,
    checkpoint_option,
    checkpoints_option,
    dtype_option,
    out_option,
    pass_settings,
    split_option,
)
from curvlake.constants import (
    INPUT_SPACES,
    JACOBIAN_METRICS,
    NORM_METHODS,
    NORMALIZATIONS,
    STATS_METRICS,
)
from curvlake.validation import refuse_unused


@click.group(cls=CurvlakeGroup)
def stats():
    """Per-example statistics (input-Jacobian norms, confidence, loss) over checkpoints."""


def _run_ids(settings: Settings, run_ids: tuple[str, ...], grid_file: str | None) -> list[str]:
    ids = list(run_ids)
    if grid_file:
        from curvlake.nn.grids import expand_train_grid, load_grid
        from curvlake.pipelines.train import run_id_of

        lake_ = settings.lake()
        for config in expand_train_grid(load_grid(grid_file)):
            run_id = run_id_of(config)
            lake_.info(run_id)  # a clear error when that run was not trained
            ids.append(run_id)
    return ids


@stats.command("compute")
@click.option("--run", "run_ids", multiple=True, help="Run id (repeatable).")
@click.option(
    "--grid",
    "grid_file",
    type=click.Path(dir_okay=False),
    help="The runs of a training grid file (as given to `curvlake train --grid`).",
)
@checkpoints_option()
@split_option()
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    type=click.Choice(STATS_METRICS),
    default=["jacobian_operator"],
    show_default=True,
    help="Statistic to compute (repeatable).",
)
@click.option(
    "--normalization",
    default="none",
    show_default=True,
    type=click.Choice(NORMALIZATIONS),
    help="Output map before the Jacobian (none: the logits).",
)
@click.option("--target-only", is_flag=True, help="Only the Jacobian row of the target class.")
@click.option(
    "--input-space",
    type=click.Choice(INPUT_SPACES),
    help="Differentiate w.r.t. the model's (standardized) inputs or the raw inputs.",
    default="standardized",
    show_default=True,
)
@click.option(
    "--method",
    type=click.Choice(NORM_METHODS),
    default="exact",
    show_default=True,
    help="Operator norm: exact Gram or matrix-free Lanczos.",
)
@dtype_option()
@block_size_option(256)
@pass_settings
def stats_compute(
    settings: Settings,
    run_ids,
    grid_file,
    checkpoints,
    split,
    metrics,
    normalization,
    target_only,
    input_space,
    method,
    dtype,
    block_size,
):
    """Compute per-example statistics of runs at checkpoints over a whole split."""
    from curvlake.pipelines.jacobian_stats.pipeline import run_stats

    runs_ = _run_ids(settings, run_ids, grid_file)
    if not runs_:
        raise click.UsageError("give --run RUN_ID (repeatable) or --grid FILE")
    if not set(metrics) & set(JACOBIAN_METRICS):
        refuse_unused(
            "without a Jacobian metric (jacobian_frobenius, jacobian_operator)",
            **given("input_space"),
        )
    checkpoints = checkpoint_list(checkpoints)
    lake_ = settings.lake()
    with settings.cluster_session():
        stats_id = run_stats(
            lake_,
            runs_,
            metrics=metrics,
            split=split,
            checkpoints=checkpoints,
            normalization=normalization,
            target_only=target_only,
            input_space=input_space,
            method=method,
            dtype=dtype,
            block_size=block_size,
        )
    ds = lake_.open(stats_id)
    click.echo(stats_id)
    for metric in ds.attrs["metrics"]:
        means = ds[metric].isel(checkpoint=-1).mean("example").values
        click.echo(
            f"  mean {metric} at the last checkpoint, per run: "
            + ", ".join(f"{v:.4g}" for v in means)
        )


@stats.command("plot")
@click.argument("stats_id")
@click.option(
    "--metric",
    type=click.Choice(STATS_METRICS),
    help="Statistic whose mean is drawn against width (default: the first one stored).",
)
@checkpoint_option()
@out_option("Figure path, .png, .pdf or .svg (default: ID.png).")
@pass_settings
def stats_plot(settings: Settings, stats_id, metric, checkpoint, out):
    """Draw mean METRIC and train/test error against model width, one series per model
    family and label noise."""
    from curvlake.pipelines.jacobian_stats.plot import (
        default_metric,
        plot_width_sweep,
        width_table,
    )

    lake_ = settings.lake()
    metric = metric or default_metric(lake_, stats_id)
    path = plot_width_sweep(
        lake_, stats_id, out or f"{stats_id}.png", metric=metric, checkpoint=checkpoint
    )
    table = width_table(lake_, stats_id, metric, checkpoint)
    family = max(len("series"), *(len(s) for s in table["series"]))
    click.echo(
        f"{'series':<{family}} {'epoch':>5} {'width':>8} {'mean ' + metric:>24} "
        f"{'train err':>10} {'test err':>10}"
    )
    for i, width in enumerate(table["width"]):
        click.echo(
            f"{table['series'][i]:<{family}} {table['epoch'][i]:>5} {width:>8g} "
            f"{table['mean'][i]:>24.4g} {table['train_error'][i]:>10.3f} "
            f"{table['test_error'][i]:>10.3f}"
        )
    click.echo(f"wrote {path}")
