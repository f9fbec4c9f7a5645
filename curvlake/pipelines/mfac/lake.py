"""Gradient windows read back from the lake, as the operand of an inverse Fisher.

:func:`open_grad_window` checks a ``grad_window`` artifact and says what its columns are;
:func:`window_operand` gives its gradients as NumPy or CuPy column chunks, or as a Dask array
reading the stored chunks (all rows × a column range) when the window does not fit in memory.
``InverseFisher.from_lake`` and ``BlockedInverseFisher.from_lake`` build on these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from curvlake.constants import WINDOW_BACKENDS
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.nn.params import LayerTable, table_from_arrays
from curvlake.pipelines.skeleton import as_lake, require_artifact
from curvlake.validation import Options, check

__all__ = ["GradWindow", "open_grad_window", "window_operand"]

#: Share of the memory budget a window may take in memory before ``auto`` reads it with Dask
#: (the kernels make a float64 copy of one chunk at a time on top of it).
_IN_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class GradWindow:
    """What a ``grad_window`` artifact holds (its gradients stay in the lake).

    Attributes:
        id: the artifact id.
        lake_url: its lake.
        run: the run whose checkpoint the gradients were taken at.
        checkpoint: the checkpoint index.
        n_grads: m, the number of gradients (rows).
        n_columns: d, the number of columns.
        coordinates: the θ coordinate of each column (sorted), or None when the columns are
            all of θ.
        table: the layer table of the run's θ.
        dtype: the stored dtype.
        chunk_columns: columns per stored chunk.
    """

    id: str
    lake_url: str
    run: str
    checkpoint: int
    n_grads: int
    n_columns: int
    coordinates: np.ndarray | None
    table: LayerTable
    dtype: str
    chunk_columns: int

    @property
    def nbytes(self) -> int:
        """Bytes of the gradients as stored."""
        return self.n_grads * self.n_columns * np.dtype(self.dtype).itemsize


def open_grad_window(lake: Lake | str, window_id: str) -> GradWindow:
    """The description of a complete ``grad_window`` artifact.

    Raises:
        UserInputError: not an artifact id, or an artifact of another kind.
        ArtifactNotFoundError, IncompleteArtifactError: missing or not complete.
    """
    lake = as_lake(lake)
    require_artifact(lake, window_id, "grad_window", role="gradient window")
    group = lake.group(window_id)
    attrs = group.attrs
    grad = group["gradient"]
    coordinates = (
        np.asarray(group["param_index"][:], dtype=np.int64)
        if attrs["selection"] == "mask"
        else None
    )
    return GradWindow(
        id=window_id,
        lake_url=lake.url,
        run=str(attrs["run"]),
        checkpoint=int(attrs["checkpoint"]),
        n_grads=int(grad.shape[0]),
        n_columns=int(grad.shape[1]),
        coordinates=coordinates,
        table=table_from_arrays({name: group[name][:] for name in ("layer", "layer_shape")}),
        dtype=str(np.dtype(grad.dtype)),
        chunk_columns=int(grad.chunks[1]),
    )


def _cupy_usable() -> bool:
    from curvlake.engine import _gpu_count

    return _gpu_count() > 0


def resolve_backend(window: GradWindow, backend: str) -> str:
    """``numpy``, ``cupy`` or ``dask`` for ``backend`` (``auto``: Dask when the window takes
    more than a quarter of the memory budget, else CuPy on a GPU machine, else NumPy)."""
    check("backend", backend, Options(*WINDOW_BACKENDS))
    if backend == "cupy" and not _cupy_usable():
        raise UserInputError(
            "backend='cupy' needs cupy and a CUDA GPU: pip install 'curvlake[gpu]'"
        )
    if backend != "auto":
        return backend
    from curvlake.engine import memory_budget

    if window.nbytes > _IN_MEMORY_SHARE * memory_budget():
        return "dask"
    return "cupy" if _cupy_usable() else "numpy"


def window_operand(
    lake: Lake | str, window: GradWindow | str, backend: str = "auto"
) -> tuple[Any, GradWindow]:
    """The gradients of a window as the operand of an inverse Fisher.

    Returns:
        ``(operand, window)``: the gradients read into one NumPy or CuPy array (m × d, stored
        dtype), or a lazy Dask array over the stored chunks; and the window's
        :class:`GradWindow`.
    """
    lake = as_lake(lake)
    if isinstance(window, str):
        window = open_grad_window(lake, window)
    backend = resolve_backend(window, backend)
    grad = lake.open(window.id)["gradient"].data
    if backend == "dask":
        return grad, window
    values = np.asarray(grad.compute())
    if backend == "cupy":
        import cupy

        return cupy.asarray(values), window
    return values, window
