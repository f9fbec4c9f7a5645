"""The parameter space: the flat vector θ of a model, defined once for every artifact.

θ is every tensor of ``model.named_parameters()`` (tied tensors once, as torch lists them),
flattened row-major and concatenated in that order. Frozen tensors (``requires_grad=False``)
count too: a checkpoint must restore the whole model, and a coordinate ``j`` must mean the same
entry in ``theta`` of a run, in a PEF column, a Hessian eigenvector row, an M-FAC gradient and a
parameter mask. Derivatives are taken functionally (``torch.func.functional_call`` on copies),
so a frozen tensor still has a well-defined gradient; restrict an analysis to some coordinates
with a :class:`curvlake.nn.masks.ParameterMask` instead.

The layer table (:class:`LayerTable`) says where each tensor lives in θ, so no per-coordinate
index is ever stored. θ keeps the parameters' dtype: a float64 model stores float64 ``theta``
(half-precision and bfloat16 models are stored as float32, which holds them exactly).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from curvlake.errors import UserInputError

#: torch dtypes whose values a numpy array of the same dtype stores exactly.
_STORED_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True)
class LayerTable:
    """Where each named tensor lives in a flat vector: names, shapes and dtypes, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ()

    @property
    def sizes(self) -> np.ndarray:
        return np.array([int(np.prod(s, dtype=np.int64)) for s in self.shapes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def __len__(self) -> int:
        return len(self.names)

    def slices(self) -> Iterator[tuple[str, slice, tuple[int, ...]]]:
        """``(name, slice of the flat vector, shape)`` of every tensor, in order."""
        for name, offset, size, shape in zip(
            self.names, self.offsets, self.sizes, self.shapes, strict=True
        ):
            yield name, slice(int(offset), int(offset + size)), shape

    def slice_of(self, name: str) -> slice:
        """The flat-vector slice of tensor ``name``."""
        for candidate, where, _ in self.slices():
            if candidate == name:
                return where
        raise UserInputError(f"no tensor {name!r} in the layer table ({', '.join(self.names)})")

    def layer_of(self, coordinates: np.ndarray) -> np.ndarray:
        """Index (into ``names``) of the tensor holding each flat coordinate."""
        coordinates = np.asarray(coordinates, dtype=np.int64)
        if coordinates.size and (coordinates.min() < 0 or coordinates.max() >= self.total):
            raise UserInputError(f"coordinates must lie in [0, {self.total})")
        return np.searchsorted(self.offsets, coordinates, side="right") - 1

    def select(self, pattern: str | None) -> list[int]:
        """Indices of the tensors whose name matches the regular expression ``pattern``
        (``re.search``; ``None`` selects all)."""
        if pattern is None:
            return list(range(len(self.names)))
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise UserInputError(
                f"layer pattern {pattern!r} is not a regular expression: {error}"
            ) from None
        chosen = [i for i, name in enumerate(self.names) if regex.search(name)]
        if not chosen:
            raise UserInputError(
                f"layer pattern {pattern!r} matches none of: {', '.join(self.names)}"
            )
        return chosen

    @property
    def fingerprint(self) -> str:
        """A short hash of names and shapes: two tables with equal fingerprints index the same
        coordinates the same way."""
        text = ";".join(
            f"{n}:{','.join(map(str, s))}" for n, s in zip(self.names, self.shapes, strict=True)
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def shape_strings(self) -> np.ndarray:
        return np.array([",".join(map(str, s)) for s in self.shapes], dtype=object)

    @classmethod
    def from_strings(cls, names, shapes, dtypes=()) -> LayerTable:
        parsed = tuple(tuple(int(v) for v in str(s).split(",") if v != "") for s in shapes)
        return cls(tuple(str(n) for n in names), parsed, tuple(str(d) for d in dtypes))


def _named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return list(model.named_parameters())


def parameter_table(model: torch.nn.Module) -> LayerTable:
    """The layer table of θ: ``model.named_parameters()`` in order."""
    named = _named(model)
    return LayerTable(
        tuple(n for n, _ in named),
        tuple(tuple(p.shape) for _, p in named),
        tuple(str(p.dtype).removeprefix("torch.") for _, p in named),
    )


def buffer_table(model: torch.nn.Module) -> LayerTable:
    """Layer table of ``model.named_buffers()`` (BatchNorm statistics and counters)."""
    named = list(model.named_buffers())
    return LayerTable(
        tuple(n for n, _ in named),
        tuple(tuple(b.shape) for _, b in named),
        tuple(str(b.dtype).removeprefix("torch.") for _, b in named),
    )


def theta_dtype(model: torch.nn.Module) -> np.dtype:
    """The numpy dtype θ is stored in: float64 when any parameter is float64, else float32."""
    dtypes = {p.dtype for p in model.parameters()}
    return np.dtype(np.float64 if torch.float64 in dtypes else np.float32)


def flatten_parameters(model: torch.nn.Module, dtype: np.dtype | str | None = None) -> np.ndarray:
    """θ: every parameter flattened and concatenated (default dtype: :func:`theta_dtype`)."""
    dtype = np.dtype(dtype) if dtype is not None else theta_dtype(model)
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    with torch.no_grad():
        parts = [p.detach().reshape(-1).to("cpu", torch_dtype) for _, p in _named(model)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype)


def flatten_buffers(model: torch.nn.Module) -> np.ndarray:
    """All buffers, flattened and concatenated in float64 (exact for float32 and integers)."""
    parts = [b.detach().reshape(-1).to("cpu", torch.float64) for b in model.buffers()]
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float64)


def _check_length(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise UserInputError(f"{what} has {got} entries but the model needs {expected}")


def assign_parameters(model: torch.nn.Module, theta: np.ndarray | torch.Tensor) -> None:
    """Copy a flat vector θ into the parameters of ``model`` (in place, each in its dtype)."""
    table = parameter_table(model)
    _check_length("theta", int(np.prod(np.shape(theta))), table.total)
    flat = torch.as_tensor(np.ascontiguousarray(theta) if isinstance(theta, np.ndarray) else theta)
    with torch.no_grad():
        for (_, param), (_, where, _) in zip(_named(model), table.slices(), strict=True):
            param.copy_(flat[where].view(param.shape).to(param.dtype))


def assign_buffers(model: torch.nn.Module, values: np.ndarray) -> None:
    """Copy flat float64 buffer values back into the buffers of ``model`` (in place)."""
    table = buffer_table(model)
    _check_length("buffers", int(np.asarray(values).size), table.total)
    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    with torch.no_grad():
        for buf, (_, where, _) in zip(model.buffers(), table.slices(), strict=True):
            buf.copy_(flat[where].view(buf.shape).to(buf.dtype))


def unflatten(model: torch.nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of the flat tensor ``theta`` shaped like ``model.named_parameters()`` (for
    ``torch.func.functional_call``; they share ``theta``'s memory and autograd history).

    One ``torch.split`` rather than a slice per tensor: the backward of a split is one
    concatenation, that of P slices P scatters into a zero vector, which made Hessian-vector
    products (``jvp`` of ``grad``) up to 1.4x slower."""
    table = parameter_table(model)
    _check_length("theta", int(theta.numel()), table.total)
    pieces = torch.split(theta, [int(size) for size in table.sizes])
    return {
        name: piece.view(shape)
        for name, piece, shape in zip(table.names, pieces, table.shapes, strict=True)
    }


def flat_tensor(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """θ as a detached torch tensor (default: the parameters' dtype and device)."""
    parts = [p.detach().reshape(-1) for _, p in _named(model)]
    if not parts:
        return torch.zeros(0, dtype=dtype or torch.float32, device=device)
    if dtype is None:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else parts[0].dtype
    return torch.cat([p.to(device=device or p.device, dtype=dtype) for p in parts])


def table_from_arrays(arrays: Mapping[str, Sequence]) -> LayerTable:
    """The layer table stored in an artifact (``layer``, ``layer_shape`` arrays)."""
    return LayerTable.from_strings(arrays["layer"], arrays["layer_shape"])


def table_arrays(table: LayerTable) -> dict[str, np.ndarray]:
    """The arrays that store a layer table in an artifact (dims ``layer``)."""
    return {
        "layer": np.array(table.names, dtype=object),
        "layer_offset": table.offsets,
        "layer_size": table.sizes,
        "layer_shape": table.shape_strings(),
    }
