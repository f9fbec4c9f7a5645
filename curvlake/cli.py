"""The ``curvlake`` command line: parse options, call one library function, print or plot.

Every command reads the global options (lake, cluster) from the click context; a user error
(``CurvlakeError``) prints one line and exits with status 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from curvlake import __version__
from curvlake.engine import CLUSTERS, client_session
from curvlake.errors import CurvlakeError
from curvlake.lake import Lake, open_lake

DEFAULT_LAKE = "curvlake-lake"


class _Group(click.Group):
    """A click group that turns curvlake's own errors into one clear line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CurvlakeError as error:
            raise click.ClickException(str(error)) from None


@dataclass
class Settings:
    """Global options, shared by every command."""

    lake_url: str
    scheduler: str | None
    scheduler_file: str | None
    cluster: str
    workers: int | None

    def lake(self, create: bool = False) -> Lake:
        return open_lake(self.lake_url, create=create)

    def cluster_session(self):
        """The Dask client for a pipeline (started only by commands that compute)."""
        return client_session(
            address=self.scheduler,
            scheduler_file=self.scheduler_file,
            cluster=self.cluster,
            n_workers=self.workers,
        )


pass_settings = click.make_pass_decorator(Settings)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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


# -- lake --------------------------------------------------------------------------------------


@cli.group(cls=_Group)
def lake():
    """Create, list, inspect, validate and clean the lake."""


@lake.command("init")
@pass_settings
def lake_init(settings: Settings):
    """Create an empty lake at --lake (nothing happens if it already is a lake)."""
    created = settings.lake(create=True)
    click.echo(f"lake ready at {created.url}")


@lake.command("ls")
@click.option("--kind", help="Only artifacts of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@pass_settings
def lake_ls(settings: Settings, kind, as_json):
    """List the artifacts of the lake."""
    infos = settings.lake().list(kind)
    if as_json:
        for info in infos:
            click.echo(
                json.dumps(
                    {
                        "id": info.id,
                        "kind": info.kind,
                        "status": info.status,
                        "created_at": info.created_at,
                        "inputs": info.inputs,
                        "config": info.config,
                    }
                )
            )
        return
    if not infos:
        click.echo("the lake is empty" if kind is None else f"no {kind} artifacts")
        return
    rows = [
        (i.id, i.status, i.created_at, ",".join(i.inputs) or "-", i.config_summary) for i in infos
    ]
    header = ("ID", "STATUS", "CREATED", "INPUTS", "CONFIG")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(4)]
    for row in [header, *rows]:
        line = "  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths, strict=True))
        click.echo(f"{line}  {row[4]}"[:200])


@lake.command("show")
@click.argument("artifact")
@pass_settings
def lake_show(settings: Settings, artifact):
    """Print an artifact's catalog entry and its xarray structure."""
    the_lake = settings.lake()
    info = the_lake.info(artifact)
    click.echo(f"{info.id}  kind={info.kind}  status={info.status}  created={info.created_at}")
    click.echo(f"inputs: {', '.join(info.inputs) or '-'}")
    click.echo("config: " + json.dumps(info.config, sort_keys=True))
    if info.status == "complete":
        click.echo(str(the_lake.open(artifact)))
        click.echo(f'\nopen it with: xarray.open_zarr("{info.url}")')


@lake.command("validate")
@click.argument("artifact", required=False)
@click.option("--no-chunks", is_flag=True, help="Check schemas only, do not read every chunk.")
@pass_settings
def lake_validate(settings: Settings, artifact, no_chunks):
    """Check one artifact (or all complete ones) against its schema and checksums."""
    the_lake = settings.lake()
    ids = [artifact] if artifact else [i.id for i in the_lake.list() if i.status == "complete"]
    failed = 0
    for art in ids:
        try:
            the_lake.validate(art, check_chunks=not no_chunks)
            click.echo(f"ok      {art}")
        except CurvlakeError as error:
            failed += 1
            click.echo(f"FAILED  {error}")
    if failed:
        raise click.ClickException(f"{failed} of {len(ids)} artifact(s) failed validation")


@lake.command("gc")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@pass_settings
def lake_gc(settings: Settings, dry_run):
    """Remove stale staging and partial files (never complete artifacts)."""
    removed = settings.lake().gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        click.echo(f"{verb} {path}")
    click.echo(f"{verb} {len(removed)} item(s)")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="curvlake")


if __name__ == "__main__":
    sys.exit(main())
