"""Per-kind renderers: ``RENDERERS[kind](lake, info) -> [Figure, ...]``, torch-free.

Each renderer draws the standard figures of one complete artifact from what the lake stores
(matplotlib, NumPy and xarray only; the top-example collage of a run on another dataset than
the embedded digits reads the inputs through the data loaders, which import torch). A module
per kind family registers its renderers with :func:`renderer`; a kind without one gets an
inventory row and no figure.

Example::

    from curvlake.report.renderers import RENDERERS
    info = lake.info(run_id)
    for figure in RENDERERS[info.kind](lake, info):
        figure.save("figures")            # <name>.png and <name>.svg
"""

from curvlake.report.renderers import (  # noqa: F401 (each module registers its kinds)
    compare,
    hessian,
    masks,
    npeff,
    saturation,
    training,
)
from curvlake.report.renderers._registry import RENDERERS, Renderer, caption, renderer

__all__ = ["RENDERERS", "Renderer", "caption", "renderer"]
