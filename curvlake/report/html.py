"""The report as one self-contained HTML page.

Figures are inlined as base64 ``data:`` URIs, the stylesheet is inline, and there is no script,
font or other external resource; a Content-Security-Policy forbids any fetch besides inline
images, so the page opens offline and makes no network request. The page is a function of its
inputs only, with the one timestamp in ``<time id="generated-at">``.
"""

from __future__ import annotations

import base64
import html
import re
from collections import Counter
from dataclasses import dataclass, field

from curvlake.report.inventory import InventoryRow

STYLESHEET = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1.5em;
  color: #1d1d1f; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1em; margin: 1.5em 0 0.3em; } code { font-size: 0.92em; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; white-space: nowrap; }
.status { border-radius: 3px; padding: 0 4px; white-space: nowrap; }
.complete { background: #dff3e0; } .writing { background: #fff2c6; }
.failed, .problem { background: #fbd9d9; } .unknown { background: #e6e6e6; }
tr.flag td { background: #fff6f6; }
figure { margin: 0.8em 0 1.6em; } figure img { max-width: 100%; height: auto;
  border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; max-width: 60em; }
nav ol { columns: 2; } .note { color: #6b4e00; } .meta { color: #555; font-size: 12px; }
details summary { cursor: pointer; }
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class PageFigure:
    """A figure placed on the page: inlined PNG bytes (or None: linked only) and its files."""

    name: str
    caption: str
    png: bytes | None
    files: list[str]


@dataclass
class PageArtifact:
    """One artifact's block in its kind's section."""

    row: InventoryRow
    figures: list[PageFigure] = field(default_factory=list)
    note: str = ""


def section_id(kind: str) -> str:
    """The id of a kind's section."""
    return f"kind-{kind}"


def artifact_anchor(artifact: str) -> str:
    """The id of an artifact's inventory row."""
    return f"artifact-{artifact}"


def page(
    *,
    lake_url: str,
    generated_at: str,
    rows: list[InventoryRow],
    sections: dict[str, list[PageArtifact]],
    lake_total: int,
) -> str:
    """The whole HTML document.

    Args:
        lake_url: where the lake is.
        generated_at: the timestamp (the only part that changes between identical reports).
        rows: the inventory, in report order.
        sections: per kind (report order), its artifacts and their figures.
        lake_total: the number of artifacts in the lake (the report may show a selection).
    """
    flagged = [row for row in rows if not row.ok]
    n_figures = sum(len(a.figures) for artifacts in sections.values() for a in artifacts)
    selection = "" if lake_total == len(rows) else f" (a selection of the lake's {lake_total})"
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>curvlake report: {_e(lake_url)}</title>\n<style>{STYLESHEET}</style>\n",
        "</head>\n<body>\n<header>\n<h1>curvlake lake report</h1>\n",
        f'<p class="meta">Lake <code>{_e(lake_url)}</code>: {len(rows)} artifacts{selection}, '
        f"{n_figures} figures, {len(flagged)} needing attention. Generated "
        f'<time id="generated-at" datetime="{_e(generated_at)}">{_e(generated_at)}</time>.</p>\n',
        "</header>\n",
        _contents(sections, flagged),
        _attention(flagged),
        _inventory(rows),
    ]
    parts += [_kind_section(kind, artifacts) for kind, artifacts in sections.items()]
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _code(text: str) -> str:
    """Escaped text with `backquoted` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _link(artifact: str) -> str:
    return f'<a href="#{artifact_anchor(artifact)}">{_e(artifact)}</a>'


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _contents(sections: dict[str, list[PageArtifact]], flagged: list[InventoryRow]) -> str:
    items = ['<li><a href="#inventory">Inventory</a></li>']
    if flagged:
        items.insert(0, f'<li><a href="#attention">Needs attention ({len(flagged)})</a></li>')
    items += [
        f'<li><a href="#{section_id(kind)}">{_e(kind)}</a> ({len(artifacts)})</li>'
        for kind, artifacts in sections.items()
    ]
    return '<nav id="contents">\n<h2>Contents</h2>\n<ol>\n' + "\n".join(items) + "\n</ol>\n</nav>\n"


def _attention(flagged: list[InventoryRow]) -> str:
    if not flagged:
        return ""
    rows = "".join(
        f"<tr><td>{_link(row.info.id)}</td><td>{_status(row)}</td><td>{_code(row.problem)}</td>"
        f"<td>{_code(row.action)}</td></tr>\n"
        for row in flagged
    )
    return (
        '<section id="attention">\n<h2>Needs attention</h2>\n'
        "<p>Artifacts that are not complete (being written, killed or failed), damaged, or "
        "that this curvlake cannot read. Their figures are not drawn.</p>\n"
        "<table>\n<tr><th>artifact</th><th>status</th><th>problem</th><th>what to do</th></tr>\n"
        f"{rows}</table>\n</section>\n"
    )


def _status(row: InventoryRow) -> str:
    status = row.info.status
    css = status if status in ("complete", "writing", "failed") else "unknown"
    if status == "complete" and not row.ok:
        css, status = "problem", "complete, not readable"
    return f'<span class="status {css}">{_e(status)}</span>'


def _inventory(rows: list[InventoryRow]) -> str:
    counts = Counter((row.info.kind, row.info.status) for row in rows)
    statuses = sorted({status for _, status in counts})
    kinds = sorted({kind for kind, _ in counts})
    summary = (
        "<tr><th>kind</th>"
        + "".join(f"<th>{_e(s)}</th>" for s in statuses)
        + ("<th>on disk</th></tr>\n")
    )
    for kind in kinds:
        size = sum(row.bytes_on_disk for row in rows if row.info.kind == kind)
        cells = "".join(f'<td class="n">{counts.get((kind, s), 0) or ""}</td>' for s in statuses)
        summary += f'<tr><td>{_e(kind)}</td>{cells}<td class="n">{_size(size)}</td></tr>\n'
    table = "".join(_inventory_row(row) for row in rows)
    return (
        '<section id="inventory">\n<h2>Inventory</h2>\n'
        f"<table>\n{summary}</table>\n"
        "<table>\n<tr><th>artifact</th><th>kind</th><th>status</th><th>created</th>"
        "<th>curvlake / schema</th><th>made by, config</th><th>inputs</th><th>arrays</th>"
        "<th>on disk</th></tr>\n"
        f"{table}</table>\n</section>\n"
    )


def _inventory_row(row: InventoryRow) -> str:
    info = row.info
    arrays = "".join(
        f"<tr><td>{_e(a.name)}</td><td>({_e(', '.join(a.dims))})</td>"
        f"<td>{_e('x'.join(map(str, a.shape)) or 'scalar')}</td>"
        f"<td>{_e('x'.join(map(str, a.chunks)) or '-')}</td><td>{_e(a.dtype)}</td></tr>"
        for a in row.arrays
    )
    array_cell = (
        f"<details><summary>{len(row.arrays)} arrays</summary><table><tr><th>name</th>"
        f"<th>dims</th><th>shape</th><th>chunks</th><th>dtype</th></tr>{arrays}</table>"
        "</details>"
        if row.arrays
        else "none"
    )
    made = f"<code>{_e(row.made_by)}</code><br>{_e(info.config_summary)}"
    if row.problem:
        made += f'<br><span class="note">{_code(row.problem)}; {_code(row.action)}</span>'
    inputs = "<br>".join(_link(i) for i in info.inputs) or "-"
    flag = ' class="flag"' if not row.ok else ""
    return (
        f'<tr id="{artifact_anchor(info.id)}"{flag}><td><code>{_e(info.id)}</code></td>'
        f"<td>{_e(info.kind)}</td><td>{_status(row)}</td><td>{_e(info.created_at)}</td>"
        f"<td>{_e(row.package_version)} / {_e(info.schema_version)}</td><td>{made}</td>"
        f"<td>{inputs}</td><td>{array_cell}</td>"
        f'<td class="n">{_size(row.bytes_on_disk)}</td></tr>\n'
    )


def _kind_section(kind: str, artifacts: list[PageArtifact]) -> str:
    parts = [f'<section id="{section_id(kind)}">\n<h2>{_e(kind)}</h2>\n']
    for artifact in artifacts:
        info = artifact.row.info
        parts.append(f"<h3>{_link(info.id)}</h3>\n")
        if artifact.note:
            parts.append(f'<p class="note">{_code(artifact.note)}</p>\n')
        parts += [figure_markup(figure) for figure in artifact.figures]
    parts.append("</section>\n")
    return "".join(parts)


def figure_markup(figure: PageFigure) -> str:
    """A figure's HTML: the inlined image (or a link to its files) and its caption."""
    files = " · ".join(
        f'<a href="{_e(f)}">{_e(f.rsplit(".", 1)[-1].upper())}</a>' for f in figure.files
    )
    if figure.png is None:
        body = f'<p class="note">Not inlined (the page reached its size limit): open {files}.</p>'
    else:
        data = base64.b64encode(figure.png).decode("ascii")
        body = f'<img src="data:image/png;base64,{data}" alt="{_e(figure.name)}">'
    return (
        f'<figure id="figure-{_e(figure.name)}">\n{body}\n'
        f"<figcaption>{_code(figure.caption)} Files: {files}.</figcaption>\n</figure>\n"
    )
