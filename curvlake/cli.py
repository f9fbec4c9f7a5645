"""The ``curvlake`` command line: the root group with the global options.

Each command group lives in its own module of :mod:`curvlake._cli` (thin: parse options, call
one pipeline function, print or plot); options used by several commands are defined once in
:mod:`curvlake._cli.common`. A user error (``CurvlakeError``) prints one line and exits with
status 1, never a traceback.
"""

from __future__ import annotations

import sys

import click

from curvlake import __version__
from curvlake._cli import data, lake, masks, npeff, pefs, quickstart, runs, stats, train
from curvlake._cli.common import DEFAULT_LAKE, CurvlakeGroup, Settings
from curvlake.engine import CLUSTERS


@click.group(cls=CurvlakeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curvlake")
@click.option(
    "--lake",
    "lake_url",
    envvar="CURVLAKE_LAKE",
    default=DEFAULT_LAKE,
    show_default=True,
    help="Lake directory or fsspec URL (env CURVLAKE_LAKE).",
)
@click.option("--scheduler", help="Address of an existing Dask scheduler (tcp://host:8786).")
@click.option("--scheduler-file", type=click.Path(), help="Scheduler file of an existing cluster.")
@click.option(
    "--cluster",
    type=click.Choice(CLUSTERS),
    default="auto",
    show_default=True,
    help="Cluster to start when no scheduler is given.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Number of workers (or SLURM jobs).")
@click.pass_context
def cli(ctx, lake_url, scheduler, scheduler_file, cluster, workers):
    """curvlake: look inside trained networks, with every artifact in a Zarr lake."""
    ctx.obj = Settings(lake_url, scheduler, scheduler_file, cluster, workers)


for command in (
    lake.lake,
    data.data,
    train.train,
    runs.runs,
    masks.mask,
    pefs.pefs,
    npeff.npeff,
    stats.stats,
    quickstart.quickstart,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="curvlake")


if __name__ == "__main__":
    sys.exit(main())
