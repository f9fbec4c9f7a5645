"""``curvlake lake``: create, list, inspect, validate, remove, clean the lake."""

from __future__ import annotations

import json
import shutil

import click

from curvlake._cli.common import CurvlakeGroup, Settings, pass_settings
from curvlake.errors import CurvlakeError


@click.group(cls=CurvlakeGroup)
def lake():
    """Create, list, inspect, validate, remove and clean the lake."""


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
    rows = [(i.id, i.status, i.created_at, _inputs(i.inputs), i.config_summary) for i in infos]
    header = ("ID", "STATUS", "CREATED", "INPUTS", "CONFIG")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(4)]
    # CONFIG loses whole key=value pairs only; piped output (no terminal) gets 200 columns.
    columns = shutil.get_terminal_size(fallback=(200, 24)).columns
    for row in [header, *rows]:
        line = "  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths, strict=True))
        config = row[4] if row is header else whole_tokens(row[4], columns - len(line) - 3)
        click.echo(f"{line}  {config}".rstrip())


def _inputs(inputs: list[str]) -> str:
    """The first input id and how many more (all of them: `lake show ID`)."""
    if not inputs:
        return "-"
    return inputs[0] if len(inputs) == 1 else f"{inputs[0]} +{len(inputs) - 1}"


def whole_tokens(text: str, width: int) -> str:
    """The leading space-separated tokens of ``text`` that fit in ``width`` characters, with
    "…" where tokens were left out (never a token cut in the middle)."""
    if len(text) <= width:
        return text
    kept = ""
    for token in text.split(" "):
        longer = f"{kept} {token}" if kept else token
        if len(longer) + 2 > width:
            break
        kept = longer
    return f"{kept} …" if kept else "…"


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
@click.option(
    "--no-chunks",
    is_flag=True,
    help="Check schemas and that every chunk is stored, without reading every chunk.",
)
@pass_settings
def lake_validate(settings: Settings, artifact, no_chunks):
    """Check one artifact (or all complete ones): schema, stored chunks and their checksums."""
    the_lake = settings.lake()
    if artifact:
        the_lake.info(artifact)  # not an id, or not in the lake: one line, not a FAILED row
    ids = [artifact] if artifact else [i.id for i in the_lake.list() if i.status == "complete"]
    if not ids:
        click.echo("no complete artifacts to validate")
        return
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


@lake.command("rm")
@click.argument("artifact")
@click.option(
    "--recursive", "-r", is_flag=True, help="Also remove every artifact computed from it."
)
@click.option("--yes", "-y", is_flag=True, help="Remove without asking for confirmation.")
@pass_settings
def lake_rm(settings: Settings, artifact, recursive, yes):
    """Remove an artifact (complete or staged), e.g. a damaged one before recomputing it."""
    the_lake = settings.lake()
    doomed = the_lake.remove(artifact, recursive=recursive, dry_run=True)
    if not yes:
        click.confirm(f"remove {', '.join(doomed)}?", abort=True)
    for removed in the_lake.remove(artifact, recursive=recursive):
        click.echo(f"removed {removed}")


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
