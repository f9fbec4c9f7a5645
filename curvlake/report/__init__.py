"""The lake report: one offline HTML page of everything a lake holds (``curvlake report``).

- :func:`write_report`: the page (inventory, artifacts needing attention, per kind the standard
  figures) and every figure as PNG / SVG beside it;
- :data:`RENDERERS`: kind -> renderer ``(lake, info) -> [Figure]``, usable on their own;
- :func:`inventory`: status, provenance, arrays and size on disk of artifacts;
- :func:`quickstart_report`: the report at the end of ``curvlake quickstart``.

Nothing here imports torch to draw what the lake stores.
"""

from curvlake.report.build import MAX_BYTES, Report, quickstart_report, select, write_report
from curvlake.report.figures import Figure
from curvlake.report.inventory import ArrayRow, InventoryRow, inventory
from curvlake.report.renderers import RENDERERS, caption, renderer

__all__ = [
    "MAX_BYTES",
    "RENDERERS",
    "ArrayRow",
    "Figure",
    "InventoryRow",
    "Report",
    "caption",
    "inventory",
    "quickstart_report",
    "renderer",
    "select",
    "write_report",
]
