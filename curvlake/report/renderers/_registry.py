"""The renderer registry: kind -> function drawing the standard figures of one artifact."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from curvlake.lake import ArtifactInfo, Lake
from curvlake.report.commands import made_by
from curvlake.report.figures import Figure, style

#: A renderer: ``(lake, artifact info) -> figures`` of a complete artifact.
Renderer = Callable[[Lake, ArtifactInfo], list[Figure]]

#: The renderer of each kind that has figures; other kinds get an inventory row only.
RENDERERS: dict[str, Renderer] = {}


def renderer(kind: str) -> Callable[[Callable[..., Iterable[Figure]]], Renderer]:
    """Register the decorated function as the renderer of ``kind`` (drawn in the report's
    style; it may yield its figures)."""

    def register(draw: Callable[..., Iterable[Figure]]) -> Renderer:
        @functools.wraps(draw)
        def render(lake: Lake, info: ArtifactInfo) -> list[Figure]:
            with style():
                return list(draw(lake, info))

        RENDERERS[kind] = render
        return render

    return register


def caption(info: ArtifactInfo, what: str) -> str:
    """``what`` the figure shows, then which artifact and command made it."""
    summary = info.config_summary
    options = f" ({summary})" if summary else ""
    return f"{what}. Artifact {info.id}, made by `{made_by(info)}`{options}."
