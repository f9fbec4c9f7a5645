"""``curvlake report``: one offline HTML page of everything the lake holds."""

from __future__ import annotations

import click

from curvlake._cli.common import Settings, pass_settings


def comma_list(values: tuple[str, ...]) -> list[str] | None:
    """Repeated and/or comma-separated values as one list (None when none were given)."""
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return items or None


@click.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="report.html",
    show_default=True,
    help="The HTML page; its figures go to <stem>-figures/ beside it.",
)
@click.option("--kind", "kinds", multiple=True, help="Only artifacts of this kind (repeatable).")
@click.option(
    "--ids", "ids", multiple=True, help="Only these artifacts (repeatable or comma-separated)."
)
@click.option(
    "--format",
    "formats",
    type=click.Choice(("png", "svg")),
    multiple=True,
    default=("png",),
    show_default=True,
    help="Figure files written beside the page (repeatable: --format png --format svg).",
)
@click.option(
    "--dpi",
    type=click.IntRange(min=20),
    default=90,
    show_default=True,
    help="Resolution of the figures (lower keeps the page small).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes drawing figures (helps on idle cores, not on a loaded machine).",
)
@pass_settings
def report(settings: Settings, out, kinds, ids, formats, dpi, jobs):
    """Write one self-contained HTML page of the lake: inventory (status, provenance, arrays,
    size), artifacts needing attention with the commands that resume or clean them, and the
    standard figures of every complete artifact. It opens offline."""
    from curvlake.report import write_report

    result = write_report(
        settings.lake(),
        out,
        kinds=comma_list(kinds),
        ids=comma_list(ids),
        formats=formats,
        dpi=dpi,
        jobs=jobs,
    )
    inlined = "" if result.n_inlined == result.n_figures else f", {result.n_inlined} inlined"
    click.echo(
        f"{result.path}: {result.n_artifacts} artifacts, {result.n_figures} figures{inlined}, "
        f"{result.bytes / 1e6:.1f} MB; figure files in {result.figures_dir}/"
    )
