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
from curvlake._cli import (
    compare,
    data,
    hessian,
    lake,
    latents,
    masks,
    mfac,
    npeff,
    pefs,
    probes,
    prune,
    quickstart,
    receptive_field,
    report,
    runs,
    saturation,
    stats,
    train,
)
from curvlake._cli.common import DEFAULT_LAKE, CurvlakeGroup, Settings
from curvlake.engine import CLUSTERS, SLURM_JOB_TIMEOUT
from curvlake.errors import UserInputError


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
@click.option(
    "--slurm-cores",
    type=click.IntRange(min=1),
    help="--cluster slurm: cores per job (#SBATCH --cpus-per-task) [jobqueue.slurm.cores].",
)
@click.option(
    "--slurm-memory",
    help="--cluster slurm: memory per job, e.g. 16GB (#SBATCH --mem) [jobqueue.slurm.memory].",
)
@click.option(
    "--slurm-walltime",
    help="--cluster slurm: time limit per job, e.g. 02:00:00 (#SBATCH -t) "
    "[jobqueue.slurm.walltime, default 00:30:00].",
)
@click.option(
    "--slurm-partition", help="--cluster slurm: partition (#SBATCH -p) [jobqueue.slurm.queue]."
)
@click.option(
    "--slurm-account",
    help="--cluster slurm: account charged (#SBATCH -A) [jobqueue.slurm.account].",
)
@click.option(
    "--slurm-directive",
    multiple=True,
    help="--cluster slurm: another sbatch option, e.g. --slurm-directive=--gres=gpu:1 "
    "(repeatable; replaces jobqueue.slurm.job-extra-directives).",
)
@click.option(
    "--slurm-processes",
    type=click.IntRange(min=1),
    help="--cluster slurm: Dask worker processes per job, sharing its cores "
    "[jobqueue.slurm.processes, default about sqrt(cores)].",
)
@click.option(
    "--slurm-job-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="--cluster slurm: seconds to wait for the first job's worker "
    f"(default {SLURM_JOB_TIMEOUT:g}).",
)
@click.pass_context
def cli(ctx, lake_url, scheduler, scheduler_file, cluster, workers, **slurm_options):
    """curvlake: look inside trained networks, with every artifact in a Zarr lake.

    Settings in [brackets] can live in dask-jobqueue's ~/.config/dask/jobqueue.yaml instead.
    """
    given = ", ".join(
        "--" + name.replace("_", "-") for name, value in slurm_options.items() if value
    )
    if given and cluster != "slurm":
        raise UserInputError(f"{given}: only with --cluster slurm (not --cluster {cluster})")
    if given and (scheduler or scheduler_file):
        raise UserInputError(
            f"{given}: not with --scheduler/--scheduler-file (an existing cluster)"
        )
    directives = slurm_options["slurm_directive"]
    slurm = {
        "cores": slurm_options["slurm_cores"],
        "memory": slurm_options["slurm_memory"],
        "walltime": slurm_options["slurm_walltime"],
        "queue": slurm_options["slurm_partition"],
        "account": slurm_options["slurm_account"],
        "job_extra_directives": list(directives) if directives else None,
        "processes": slurm_options["slurm_processes"],
    }
    ctx.obj = Settings(
        lake_url,
        scheduler,
        scheduler_file,
        cluster,
        workers,
        slurm={name: value for name, value in slurm.items() if value is not None},
        slurm_job_timeout=slurm_options["slurm_job_timeout"],
    )


for command in (
    lake.lake,
    data.data,
    train.train,
    runs.runs,
    masks.mask,
    pefs.pefs,
    npeff.npeff,
    stats.stats,
    hessian.hessian,
    mfac.mfac,
    prune.prune,
    saturation.saturation,
    latents.latents,
    probes.probes,
    receptive_field.receptive_field,
    report.report,
    compare.compare,
    quickstart.quickstart,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="curvlake")


if __name__ == "__main__":
    sys.exit(main())
