"""Report figures: a matplotlib figure with its name and caption, saved byte-for-byte reproducibly.

Figures are built without pyplot (no GUI backend, no global figure registry) and saved with
every varying part removed: PNGs encoded from the Agg buffer without text chunks, SVGs without
date and creator and with a fixed hash salt (the SVG backend derives its element ids from it),
so the same data gives the same bytes. Large figures are capped in pixels (:data:`MAX_PIXELS`)
and long series thinned (:func:`thin`), which keeps a report of many artifacts small.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import LogFormatter, LogFormatterMathtext
from PIL import Image

#: Default resolution of the PNGs (dots per inch).
DPI = 90
#: Upper bound on a PNG's width x height in pixels: bigger figures get a lower dpi.
MAX_PIXELS = 1_200_000
#: Points drawn per series at most (:func:`thin`).
MAX_POINTS = 2000

#: matplotlib settings of report figures (:func:`style`).
STYLE = {
    "svg.hashsalt": "curvlake-report",
    "svg.fonttype": "none",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "figure.dpi": DPI,
}
_SVG_METADATA = {"Date": None, "Creator": None}


def style() -> contextlib.AbstractContextManager:
    """The report's matplotlib settings, for drawing and saving (renderers draw inside it)."""
    return matplotlib.rc_context(STYLE)


def new_figure(width: float, height: float) -> MplFigure:
    """A constrained-layout figure of ``width`` x ``height`` inches (no pyplot: no GUI backend
    is needed)."""
    return MplFigure(figsize=(width, height), layout="constrained")


@dataclass
class Figure:
    """One figure of a report.

    Attributes:
        name: file stem, unique in a report: ``<artifact id>-<what>``.
        caption: what the figure shows, which artifact it draws and the command that made it.
        figure: the matplotlib figure (draw more on it, or save it in any format).
    """

    name: str
    caption: str
    figure: MplFigure

    def png(self, dpi: int = DPI, max_pixels: int = MAX_PIXELS) -> bytes:
        """The figure as PNG bytes, at ``dpi`` or less so that it has at most ``max_pixels``."""
        width, height = self.figure.get_size_inches()
        dpi = min(float(dpi), math.sqrt(max_pixels / max(width * height, 1e-9)))
        with style():
            _plain_log_labels(self.figure)
            self.figure.set_dpi(dpi)
            canvas = FigureCanvasAgg(self.figure)
            canvas.draw()  # one pass: the layout engine runs inside the draw
            self._freeze_layout()
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buffer, format="png")
        return buffer.getvalue()

    def svg(self) -> bytes:
        """The figure as SVG bytes (text as text, in the viewer's sans-serif font)."""
        buffer = io.BytesIO()
        with style():
            _plain_log_labels(self.figure)
            if self.figure.get_layout_engine() is not None:
                self.figure.draw_without_rendering()
                self._freeze_layout()
            self.figure.savefig(buffer, format="svg", metadata=_SVG_METADATA)
        return buffer.getvalue()

    def save(self, folder: str | Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
        """Write ``<folder>/<name>.<format>`` for each format; return the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for fmt in formats:
            path = folder / f"{self.name}.{fmt}"
            path.write_bytes(self.png() if fmt == "png" else self.svg())
            paths.append(path)
        return paths

    def _freeze_layout(self) -> None:
        """Keep the positions of the last draw: with a layout engine every save would lay the
        figure out again in an extra draw, and laying out text is most of a report's cost."""
        self.figure.set_layout_engine("none")


def _plain_log_labels(figure: MplFigure) -> None:
    """Tick labels of log axes as plain numbers (0.01, 1e-05): the default ones are mathtext
    (``$10^{-2}$``), whose parsing costs more than everything else a figure draws."""
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for set_formatter, formatter in (
                (axis.set_major_formatter, axis.get_major_formatter()),
                (axis.set_minor_formatter, axis.get_minor_formatter()),
            ):
                if isinstance(formatter, LogFormatterMathtext):
                    set_formatter(
                        LogFormatter(
                            base=formatter._base,
                            labelOnlyBase=formatter.labelOnlyBase,
                            minor_thresholds=formatter.minor_thresholds,
                        )
                    )


def thin(*series: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, ...]:
    """Every ``s``-th point of equally long series (and the last one) so that at most about
    ``max_points`` remain; short series are returned as they are."""
    n = len(series[0])
    if n <= max_points:
        return series
    index = np.unique(np.append(np.arange(0, n, math.ceil(n / max_points)), n - 1))
    return tuple(np.asarray(s)[index] for s in series)
