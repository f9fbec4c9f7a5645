"""Declarative artifact specs and the one validator for on-disk groups and xarray Datasets.

A spec names every array of an artifact kind with its dimension names, dtype family, role
(data variable or coordinate) and the chunking policy; the required attributes; and a
``MAJOR.MINOR`` version. MAJOR changes break readers; MINOR changes may only add optional parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from curvlake.errors import SchemaError

DTypeFamily = Literal[
    "float", "float32", "float64", "int", "int32", "int64", "uint8", "bool", "str"
]

#: Default memory budget of one stored chunk (bytes): large enough for fast I/O, small enough that
#: ``chunk x workers`` stays far below a worker's memory.
DEFAULT_CHUNK_BYTES = 32 * 2**20


def rows_within_budget(
    shape: tuple[int, ...], itemsize: int, budget: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """Chunk along the first axis only, as many whole rows as fit in ``budget`` bytes.

    This is the policy for per-example arrays: ``example`` is the first dimension and a chunk
    is a block of whole examples, so a task that owns a block of examples owns whole chunks.
    """
    if not shape:
        return ()
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = max(1, min(shape[0], budget // row_bytes))
    return (rows, *shape[1:])


def whole_array(shape: tuple[int, ...], itemsize: int, budget: int = DEFAULT_CHUNK_BYTES):
    """One chunk for the whole array (small tables and coordinates)."""
    return tuple(max(1, s) for s in shape)


def one_row_per_chunk(shape: tuple[int, ...], itemsize: int, budget: int = DEFAULT_CHUNK_BYTES):
    """One chunk per index of the first axis (e.g. one checkpoint per chunk row)."""
    if not shape:
        return ()
    return (1, *(max(1, s) for s in shape[1:]))


ChunkPolicy = Callable[[tuple[int, ...], int, int], tuple[int, ...]]


@dataclass(frozen=True)
class ArraySpec:
    """One array of an artifact.

    Attributes:
        name: array (variable) name inside the artifact group.
        dims: dimension names, in order.
        dtype: dtype family: an exact numpy dtype name or ``float``/``int`` for any width.
        description: what the array holds (goes into docs/SCHEMA.md).
        role: ``data`` (a data variable) or ``coord`` (a coordinate of the xarray Dataset).
        required: whether every artifact of the kind has it.
        chunking: chunking policy ``(shape, itemsize, budget) -> chunks``.
        variants: the values of the spec's ``variant_attr`` for which the array is required
            (``None``: every variant).
        sparse: whether a complete artifact may lack chunks of this array, which then read as
            the fill value. Every other array has every chunk stored, so a missing chunk is
            corruption (DESIGN.md, "The lake contract").
    """

    name: str
    dims: tuple[str, ...]
    dtype: DTypeFamily
    description: str
    role: Literal["data", "coord"] = "data"
    required: bool = True
    chunking: ChunkPolicy = rows_within_budget
    variants: tuple[str, ...] | None = None
    sparse: bool = False

    def accepts_dtype(self, dtype: np.dtype) -> bool:
        """Whether a numpy dtype belongs to this array's dtype family."""
        dtype = np.dtype(dtype)
        if self.dtype == "float":
            return np.issubdtype(dtype, np.floating)
        if self.dtype == "int":
            return np.issubdtype(dtype, np.integer)
        if self.dtype == "str":
            return dtype.kind in "OUT" or dtype == np.dtypes.StringDType()
        return dtype == np.dtype(self.dtype)

    def storage_dtype(self) -> str:
        """The dtype used when a writer does not say."""
        return {"float": "float32", "int": "int64"}.get(self.dtype, self.dtype)


@dataclass(frozen=True)
class AttrSpec:
    """A required (or optional) attribute of an artifact group."""

    name: str
    description: str
    required: bool = True


@dataclass(frozen=True)
class ArtifactSpec:
    """The schema of one artifact kind.

    Attributes:
        kind: the artifact kind; artifacts live at ``<lake>/<kind>/<id>``.
        version: ``MAJOR.MINOR``.
        description: what the artifact is (goes into docs/SCHEMA.md).
        arrays: the arrays.
        attrs: kind-specific attributes (besides the ``curvlake:`` lifecycle attributes).
        variant_attr: attribute whose value selects which optional arrays are required.
        example: builds a tiny valid instance ``(arrays, attrs)``; used by the conformance tests
            and as executable documentation.
        summary_keys: config entries shown by ``curvlake lake ls`` (empty: every scalar).
    """

    kind: str
    version: str
    description: str
    arrays: tuple[ArraySpec, ...]
    attrs: tuple[AttrSpec, ...] = ()
    variant_attr: str | None = None
    example: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]] | None = field(
        default=None, compare=False
    )
    summary_keys: tuple[str, ...] = ()

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def array(self, name: str) -> ArraySpec:
        """The spec of array ``name``; a clear error when the kind has no such array."""
        for spec in self.arrays:
            if spec.name == name:
                return spec
        known = ", ".join(a.name for a in self.arrays)
        raise SchemaError(f"kind {self.kind!r} has no array {name!r} (its arrays: {known})")

    def coords(self) -> list[str]:
        return [a.name for a in self.arrays if a.role == "coord"]

    def sparse_arrays(self) -> frozenset[str]:
        """Names of the arrays whose chunks may be absent (read as the fill value)."""
        return frozenset(a.name for a in self.arrays if a.sparse)

    def chunks_for(
        self, name: str, shape: tuple[int, ...], dtype: Any, budget: int = DEFAULT_CHUNK_BYTES
    ) -> tuple[int, ...]:
        """Chunk shape of array ``name`` by the spec's policy."""
        return tuple(self.array(name).chunking(tuple(shape), np.dtype(dtype).itemsize, budget))


@dataclass(frozen=True)
class ArrayInfo:
    """What a validator needs to know of one stored array (no data)."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype


def validate_arrays(
    spec: ArtifactSpec,
    arrays: Mapping[str, ArrayInfo],
    attrs: Mapping[str, Any],
    where: str,
) -> None:
    """Check arrays and attributes against a spec; raise SchemaError listing every problem.

    Args:
        spec: the kind's spec.
        arrays: name -> dims/shape/dtype of each stored array.
        attrs: the artifact's attributes.
        where: how to name the artifact in error messages.
    """
    problems: list[str] = []
    variant = attrs.get(spec.variant_attr) if spec.variant_attr else None
    if spec.variant_attr and spec.variant_attr not in attrs:
        problems.append(f"missing attribute {spec.variant_attr!r}")
    sizes: dict[str, tuple[int, str]] = {}
    for array_spec in spec.arrays:
        info = arrays.get(array_spec.name)
        needed = array_spec.required and (
            array_spec.variants is None or variant in array_spec.variants
        )
        if info is None:
            if needed:
                problems.append(f"missing array {array_spec.name!r}")
            continue
        if tuple(info.dims) != array_spec.dims:
            problems.append(
                f"array {array_spec.name!r} has dims {tuple(info.dims)}, expected {array_spec.dims}"
            )
            continue
        if not array_spec.accepts_dtype(info.dtype):
            problems.append(
                f"array {array_spec.name!r} has dtype {info.dtype}, expected {array_spec.dtype}"
            )
        for dim, size in zip(info.dims, info.shape, strict=True):
            if dim in sizes and sizes[dim][0] != size:
                other_size, other = sizes[dim]
                problems.append(
                    f"dimension {dim!r} is {size} in {array_spec.name!r} "
                    f"but {other_size} in {other!r}"
                )
            sizes.setdefault(dim, (size, array_spec.name))
    for attr in spec.attrs:
        if attr.required and attr.name not in attrs:
            problems.append(f"missing attribute {attr.name!r}")
    if problems:
        raise SchemaError(
            f"{where} does not match schema {spec.kind} v{spec.version}: " + "; ".join(problems)
        )
