"""``curvlake report``: one offline HTML page of everything a lake holds, figures beside it."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from curvlake.errors import UserInputError
from curvlake.lake import ArtifactInfo, Lake, open_lake
from curvlake.pipelines.skeleton import as_lake
from curvlake.report.figures import DPI
from curvlake.report.html import PageArtifact, PageFigure, figure_markup, page
from curvlake.report.inventory import InventoryRow, inventory
from curvlake.report.renderers import RENDERERS
from curvlake.validation import Interval, check

#: Largest report page (bytes); figures past it are linked instead of inlined.
MAX_BYTES = 20 * 2**20
#: Figure formats that can be written beside the page.
FORMATS = ("png", "svg")
#: The default: drawing the SVGs too takes about a third more time.
DEFAULT_FORMATS = ("png",)


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        path: the HTML page.
        figures_dir: the folder of figure files beside it.
        n_artifacts: artifacts in the report.
        n_figures: figures drawn.
        n_inlined: figures inlined into the page (the others are only linked).
        bytes: size of the page.
    """

    path: Path
    figures_dir: Path
    n_artifacts: int
    n_figures: int
    n_inlined: int
    bytes: int


def select(
    lake: Lake, kinds: Sequence[str] | None = None, ids: Sequence[str] | None = None
) -> list[ArtifactInfo]:
    """The lake's artifacts (complete and staged) of ``kinds`` and among ``ids`` (None: all),
    in report order: by kind, then creation time, then id.

    Raises:
        UserInputError: a kind with no artifact in the lake, or an id that is not there.
    """
    infos = lake.list()
    if kinds:
        present = sorted({i.kind for i in infos})
        missing = sorted(set(kinds) - set(present))
        if missing:
            raise UserInputError(
                f"no artifact of kind {', '.join(missing)} in lake {lake.url} (kinds present: "
                f"{', '.join(present) or 'none'})"
            )
        infos = [i for i in infos if i.kind in kinds]
    if ids:
        for artifact in ids:
            lake.info(artifact)  # a clear error for an unknown id
        infos = [i for i in infos if i.id in set(ids)]
    return sorted(infos, key=lambda i: (i.kind, i.created_at, i.id))


def write_report(
    lake: Lake | str,
    out: str | Path = "report.html",
    *,
    kinds: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dpi: int = DPI,
    max_bytes: int = MAX_BYTES,
    jobs: int = 1,
    generated_at: str | None = None,
) -> Report:
    """Write the report of a lake: ``out`` (HTML) and every figure in ``<out stem>-figures/``.

    The page has a table of contents, the artifacts needing attention (with the commands that
    resume or clean them), the inventory (status, provenance, arrays with shapes and chunks,
    size on disk) and one section per kind with the standard figures of each complete
    artifact (:data:`curvlake.report.renderers.RENDERERS`; kinds without a renderer get their
    inventory row only). A figure that cannot be drawn is noted in its section, never fatal.
    The same lake gives the same bytes but for the timestamp.

    Args:
        lake: the lake (or its URL).
        out: path of the HTML page.
        kinds: only artifacts of these kinds.
        ids: only these artifacts.
        formats: figure files written beside the page (``png`` and / or ``svg``).
        dpi: resolution of the PNGs.
        max_bytes: size limit of the page; figures that would exceed it are linked only.
        jobs: processes drawing figures (spawned workers; worth it on idle cores, not on a
            loaded machine: benchmarks/RESULTS.md); the page does not depend on it.
        generated_at: the timestamp shown (default: now, UTC).

    Raises:
        UserInputError: bad formats, a kind or id not in the lake.
    """
    lake = as_lake(lake)
    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise UserInputError(f"formats {bad} are not valid: must be among {', '.join(FORMATS)}")
    check("jobs", jobs, Interval(int, 1, None))
    infos = select(lake, kinds, ids)
    out = Path(out)
    folder = out.with_name(f"{out.stem}-figures")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("*.png"), *folder.glob("*.svg")]:
        stale.unlink()
    rows = inventory(lake, infos)
    sections: dict[str, list[PageArtifact]] = {}
    for row, artifact in zip(
        rows, _draw_all(lake, rows, folder, tuple(formats), dpi, jobs), strict=True
    ):
        sections.setdefault(row.info.kind, []).append(artifact)
    stamp = generated_at or datetime.now(UTC).isoformat(timespec="seconds")
    text = _fit(lake, stamp, rows, sections, max_bytes, len(lake.list()))
    out.write_text(text, encoding="utf-8")
    figures = [f for artifacts in sections.values() for a in artifacts for f in a.figures]
    return Report(
        path=out,
        figures_dir=folder,
        n_artifacts=len(rows),
        n_figures=len(figures),
        n_inlined=sum(f.png is not None for f in figures),
        bytes=_size(text),
    )


def _draw_all(
    lake: Lake,
    rows: list[InventoryRow],
    folder: Path,
    formats: tuple[str, ...],
    dpi: int,
    jobs: int,
) -> list[PageArtifact]:
    """Each artifact's figures (written into ``folder``) or why it has none, in row order."""
    tasks = [(row.info, str(folder), formats, dpi) for row in rows if _drawable(row)]
    if jobs > 1 and len(tasks) > 1:
        # spawn: zarr's I/O thread must not be inherited by a fork
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            drawn = iter(list(pool.map(_draw_in_worker, [(lake.url, *t) for t in tasks])))
    else:
        drawn = iter(_draw(lake, *task) for task in tasks)
    artifacts = []
    for row in rows:
        if not row.ok:
            artifacts.append(PageArtifact(row, note=f"{row.problem}; {row.action}"))
        elif not _drawable(row):
            artifacts.append(
                PageArtifact(row, note=f"no standard figures for kind {row.info.kind}")
            )
        else:
            figures, note = next(drawn)
            artifacts.append(PageArtifact(row, figures=figures, note=note))
    return artifacts


def _drawable(row: InventoryRow) -> bool:
    return row.ok and row.info.kind in RENDERERS


def _draw_in_worker(task: tuple) -> tuple[list[PageFigure], str]:
    lake_url, *arguments = task
    return _draw(open_lake(lake_url), *arguments)


def _draw(
    lake: Lake, info: ArtifactInfo, folder: str, formats: tuple[str, ...], dpi: int
) -> tuple[list[PageFigure], str]:
    """The figures of one artifact, written into ``folder``; or a note why there are none."""
    try:
        figures = RENDERERS[info.kind](lake, info)
    # A report shows every artifact it can: one that cannot be drawn (an old attribute layout,
    # a missing input) is noted in its section, whatever the error.
    except Exception as error:
        return [], f"figures not drawn: {type(error).__name__}: {error}"
    placed = []
    for figure in figures:
        png = figure.png(dpi)
        files = []
        for fmt in formats:
            path = Path(folder) / f"{figure.name}.{fmt}"
            path.write_bytes(png if fmt == "png" else figure.svg())
            files.append(f"{path.parent.name}/{path.name}")
        placed.append(PageFigure(figure.name, figure.caption, png, files))
    return placed, ""


def _fit(
    lake: Lake,
    stamp: str,
    rows: list[InventoryRow],
    sections: dict[str, list[PageArtifact]],
    max_bytes: int,
    lake_total: int,
) -> str:
    """The page with figures inlined, in report order, as long as it stays within max_bytes
    (the others are linked)."""
    figures = [f for artifacts in sections.values() for a in artifacts for f in a.figures]
    pngs = [f.png for f in figures]
    for figure in figures:
        figure.png = None

    def render() -> str:
        return page(
            lake_url=lake.url,
            generated_at=stamp,
            rows=rows,
            sections=sections,
            lake_total=lake_total,
        )

    budget = max_bytes - _size(render())
    for figure, png in zip(figures, pngs, strict=True):
        linked = _size(figure_markup(figure))
        figure.png = png
        cost = _size(figure_markup(figure)) - linked
        if cost > budget:
            figure.png = None
        else:
            budget -= cost
    return render()


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def quickstart_report(lake: Lake, echo: Callable[[str], None] = print) -> str:
    """Write the report of the quickstart's lake beside it (in the working directory for a
    remote lake), print where, and return its path."""
    folder = Path(lake.url).parent if lake.local else Path.cwd()
    report = write_report(lake, folder / "quickstart-report.html")
    echo(
        f"report of the lake ({report.n_artifacts} artifacts, {report.n_figures} figures): "
        f"{report.path}"
    )
    return str(report.path)


__all__ = [
    "DEFAULT_FORMATS",
    "FORMATS",
    "MAX_BYTES",
    "Report",
    "quickstart_report",
    "select",
    "write_report",
]
