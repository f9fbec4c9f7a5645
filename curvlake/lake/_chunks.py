"""Reading stored chunks into Dask: zarr's decode path, and a direct path for raw local chunks.

A lake artifact's float arrays are stored uncompressed: each chunk file holds the chunk's bytes
(C order, little endian) followed by their crc32c, 4 bytes little endian (zarr v3 codecs
``bytes`` + ``crc32c``). zarr reads such a file into one buffer, verifies it, and copies the
payload into a second, freshly allocated output array: two copies and two sets of page faults
per chunk, which is most of what a read-bound pipeline spends its time on. For the common read
— one Dask task asks for exactly one whole chunk of a local array — :class:`RawChunkReader`
maps the file copy-on-write (``mmap``, ``MAP_PRIVATE``; chunks of 1 MiB and more, smaller ones
are read into a fresh buffer) and returns a view of the mapping after verifying the checksum:
no copy at all, the page cache's pages are the array's memory (writes to
the array stay private and never reach the file). From the page cache, one process reading
and summing the 64 chunks of a 2 GiB array: zarr 2.6–6.0 s, mapped 0.43–0.50 s; through Dask
from disk see ``benchmarks/lake_io.py``. Complete artifacts are immutable, so a mapped chunk
file is never truncated under a reader (deleting it is safe: the mapping keeps the pages).

Everything else (compressed, sharded or string arrays, remote stores, selections that are not
one whole chunk) goes through zarr. Both paths return identical arrays
(``tests/lake/test_chunks.py``).

Every chunk of a complete artifact is stored (writers write all-fill chunks too), so on both
paths a missing chunk file is corruption and raises :class:`CorruptChunkError`, never reads as
the fill value; only arrays whose spec declares them ``sparse`` may lack chunks. On the zarr
path :class:`GuardedStore` sees the store answer "no such key" for a chunk: no extra request.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import AsyncGenerator, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import crc32c
import dask.array as da
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.array import AsyncArray
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, StorePath, WrapperStore

from curvlake.errors import CorruptChunkError

CHECKSUM_BYTES = 4
# Smaller chunks are read into a fresh buffer instead of mapped: a mapping per tiny chunk gains
# nothing, and a result assembled from very many of them would hold one mapping each (Linux
# allows 65530 per process by default).
MAP_MIN_BYTES = 1 << 20


METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


class ChecksumMismatch(ValueError):
    """A chunk's bytes do not match its stored crc32c (or the file has the wrong size)."""


class MissingChunk(LookupError):
    """A chunk file that should exist does not; ``args[0]`` is its key (``c/1/0``)."""


def rm_hint(artifact: str) -> str:
    """How to recover from a damaged artifact."""
    return f"remove it with `curvlake lake rm {artifact}` and rerun the command that made it"


def missing_chunk_error(artifact: str, name: str, chunk: str) -> CorruptChunkError:
    """The error for a chunk of a complete artifact that is not stored."""
    return CorruptChunkError(
        f"artifact {artifact}: array {name!r}: chunk {chunk} is missing, the stored data is "
        f"damaged; {rm_hint(artifact)}"
    )


def checksum_error(artifact: str, name: str, where: str) -> CorruptChunkError:
    """The error for a chunk (``where``: which one, or which selection) failing its checksum."""
    return CorruptChunkError(
        f"artifact {artifact}: array {name!r}: {where} failed its crc32c checksum, the stored "
        f"data is damaged; {rm_hint(artifact)}"
    )


def in_selection(selection: Any) -> str:
    """``where`` of :func:`checksum_error` when only the selection is known."""
    text = str(selection)
    return "a chunk in " + (text if len(text) <= 80 else text[:77] + "...")


def _is_checksum_failure(error: ValueError) -> bool:
    # zarr's crc32c codec raises a plain ValueError ("Stored and computed checksum do not
    # match"); ChecksumMismatch is the direct path's.
    return isinstance(error, ChecksumMismatch) or "checksum" in str(error)


def split_chunk_key(key: str) -> tuple[str, str] | None:
    """``(array name, chunk key)`` of a store key such as ``values/c/1/0``; None for metadata.

    The array name is the last path component before the chunk key (an artifact's arrays sit
    directly in its group, whatever the store's root).
    """
    if key.rsplit("/", 1)[-1] in METADATA_NAMES:
        return None
    if key.endswith("/c"):  # the one chunk of a 0-d array
        path, chunk = key[:-2], "c"
    else:
        path, sep, rest = key.partition("/c/")
        if not sep:
            return None
        chunk = "c/" + rest
    return path.rsplit("/", 1)[-1], chunk


class GuardedStore(WrapperStore[Store]):
    """A read-only view of a store in which a missing chunk raises instead of reading as fill.

    Zarr asks the store for every chunk a selection touches and fills the chunks the store does
    not have; this wrapper turns that answer into :class:`CorruptChunkError` naming artifact,
    array and chunk (arrays named in ``sparse`` keep the fill value). It costs nothing on
    present chunks and works for local and fsspec stores alike.
    """

    def __init__(self, store: Store, artifact: str, sparse: Collection[str] = ()):
        super().__init__(store)
        self.artifact = artifact
        self.sparse = frozenset(sparse)

    def _with_store(self, store: Store) -> GuardedStore:
        return type(self)(store, self.artifact, self.sparse)

    def __repr__(self) -> str:
        return f"GuardedStore({self._store!r}, {self.artifact!r})"

    def _absent(self, key: str) -> None:
        parts = split_chunk_key(key)
        if parts is not None and parts[0] not in self.sparse:
            raise missing_chunk_error(self.artifact, *parts)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            self._absent(key)
        return value

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values, strict=True):
            if value is None:
                self._absent(key)
        return values

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        async for key, value in self._store._get_many(requests):
            if value is None:
                self._absent(key)
            yield key, value


class GuardedArray(zarr.Array):
    """A zarr array of a complete artifact: reads that hit a chunk failing its checksum raise
    :class:`CorruptChunkError` naming artifact and array (missing chunks raise in its
    :class:`GuardedStore`)."""

    def __getitem__(self, selection: Any) -> Any:
        try:
            return super().__getitem__(selection)
        except ValueError as error:
            store = self.store_path.store
            if not _is_checksum_failure(error) or not isinstance(store, GuardedStore):
                raise
            raise checksum_error(store.artifact, self.basename, in_selection(selection)) from error


class GuardedGroup(zarr.Group):
    """The read-only group of a complete artifact (on a :class:`GuardedStore`) whose arrays are
    :class:`GuardedArray`: what :meth:`curvlake.lake.Lake.group` returns."""

    def __getitem__(self, path: str) -> Any:
        return _guard_node(super().__getitem__(path))

    def get(self, path: str, default: Any = None) -> Any:
        return _guard_node(super().get(path, default))

    def arrays(self) -> Iterator[tuple[str, Any]]:
        for name, array in super().arrays():
            yield name, GuardedArray(array._async_array)

    def members(self, max_depth: int | None = 0, **kwargs: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((k, _guard_node(v)) for k, v in super().members(max_depth, **kwargs))


def _guard_node(node: Any) -> Any:
    if isinstance(node, zarr.Array) and not isinstance(node, GuardedArray):
        return GuardedArray(node._async_array)
    if isinstance(node, zarr.Group) and not isinstance(node, GuardedGroup):
        return GuardedGroup(node._async_group)
    return node


def unguarded_store(array: zarr.Array) -> Store:
    """The store under an array's :class:`GuardedStore` (or its store)."""
    store = array.store_path.store
    return store._store if isinstance(store, GuardedStore) else store


def guarded_array(array: zarr.Array, artifact: str, sparse: Collection[str] = ()) -> zarr.Array:
    """``array`` read through a :class:`GuardedStore` (no I/O: the metadata is reused)."""
    store = array.store_path.store
    if isinstance(store, GuardedStore):
        return array
    async_array = array._async_array
    return zarr.Array(
        AsyncArray(
            async_array.metadata,
            StorePath(GuardedStore(store, artifact, sparse), array.store_path.path),
            async_array.config,
        )
    )


def has_raw_layout(array: zarr.Array) -> bool:
    """Whether ``array``'s chunks are raw little-endian numbers followed by a crc32c.

    Such a chunk file always has ``prod(chunks) * itemsize + 4`` bytes (edge chunks are
    stored whole), which :func:`chunk_problems` checks without reading it.
    """
    if array.metadata.zarr_format != 3 or array.ndim == 0:
        return False
    codecs = array.metadata.codecs
    if len(codecs) != 2 or not isinstance(codecs[1], Crc32cCodec):
        return False
    first = codecs[0]
    if not isinstance(first, BytesCodec):
        return False
    if getattr(first.endian, "value", first.endian) not in (None, "little"):
        return False
    native = array.dtype
    return isinstance(native, np.dtype) and native.kind in "biuf"


def chunk_problems(
    arrays: Mapping[str, zarr.Array], files: Mapping[str, int], sparse: Collection[str] = ()
) -> list[str]:
    """What is wrong with the stored chunks, from a listing alone (no chunk is read).

    Args:
        arrays: the artifact's arrays by name.
        files: size in bytes of every file under the artifact group, by path relative to it.
        sparse: arrays that may lack chunks.

    Returns:
        One line per damaged array: missing chunks, and chunk files of the wrong size for
        arrays of raw layout (:func:`has_raw_layout`).
    """
    stored: dict[str, dict[str, int]] = {}
    for path, size in files.items():
        parts = split_chunk_key(path)
        if parts is not None and parts[0] == path.partition("/")[0]:
            stored.setdefault(parts[0], {})[parts[1]] = size
    problems = []
    for name, array in arrays.items():
        present = stored.get(name, {})
        expected = [array.metadata.encode_chunk_key(c) for c in np.ndindex(*array.cdata_shape)]
        missing = [] if name in sparse else [k for k in expected if k not in present]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            problems.append(
                f"array {name!r}: {len(missing)} of {len(expected)} chunk(s) missing ({shown})"
            )
        if has_raw_layout(array):
            size = math.prod(array.chunks) * array.dtype.itemsize + CHECKSUM_BYTES
            wrong = [k for k in expected if present.get(k, size) != size]
            if wrong:
                problems.append(
                    f"array {name!r}: chunk {wrong[0]} has the wrong size"
                    + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
                )
    return problems


class RawChunkReader:
    """Reads whole chunks of a local ``bytes`` + ``crc32c`` zarr v3 array without zarr's copy."""

    def __init__(self, array: zarr.Array, sparse: bool = False):
        self.directory = Path(unguarded_store(array).root) / array.store_path.path
        self.sparse = sparse
        self.shape = tuple(array.shape)
        self.chunks = tuple(array.chunks)
        self.dtype = array.dtype.newbyteorder("<")
        self.fill_value = array.fill_value
        self.encode_chunk_key = array.metadata.encode_chunk_key
        self.chunk_nbytes = math.prod(self.chunks) * self.dtype.itemsize

    @classmethod
    def for_array(cls, array: zarr.Array, sparse: bool = False) -> RawChunkReader | None:
        """A reader when ``array``'s chunks are raw little-endian bytes + crc32c on local disk.

        A missing chunk file raises :class:`MissingChunk`, or reads as the fill value when
        ``sparse``.
        """
        if not isinstance(unguarded_store(array), LocalStore) or not has_raw_layout(array):
            return None
        return cls(array, sparse)

    def chunk_coords(self, key: tuple) -> tuple[int, ...] | None:
        """Grid coordinates when ``key`` (a tuple of slices) selects exactly one whole chunk."""
        if not isinstance(key, tuple) or len(key) != len(self.shape):
            return None
        coords = []
        for part, size, chunk in zip(key, self.shape, self.chunks, strict=True):
            if not isinstance(part, slice) or part.step not in (None, 1):
                return None
            start = 0 if part.start is None else part.start
            stop = size if part.stop is None else part.stop
            if start % chunk or stop != min(start + chunk, size) or start >= size:
                return None
            coords.append(start // chunk)
        return tuple(coords)

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk at grid ``coords``, trimmed at the array's edge."""
        extent = tuple(
            min(chunk, size - c * chunk)
            for c, size, chunk in zip(coords, self.shape, self.chunks, strict=True)
        )
        path = self.directory / self.encode_chunk_key(coords)
        size = self.chunk_nbytes + CHECKSUM_BYTES
        try:
            with open(path, "rb", buffering=0) as file:
                if os.fstat(file.fileno()).st_size != size:
                    raise ChecksumMismatch(f"chunk file {os.fspath(path)} has the wrong size")
                if size >= MAP_MIN_BYTES:
                    buffer = np.frombuffer(
                        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY), np.uint8
                    )
                else:
                    buffer = np.empty(size, np.uint8)
                    if file.readinto(buffer) != size:
                        raise ChecksumMismatch(f"chunk file {os.fspath(path)} was cut short")
        except FileNotFoundError:
            if not self.sparse:
                raise MissingChunk(self.encode_chunk_key(coords)) from None
            return np.full(extent, self.fill_value, self.dtype)
        payload = buffer[: self.chunk_nbytes]
        stored = int.from_bytes(buffer[self.chunk_nbytes :].tobytes(), "little")
        if crc32c.crc32c(payload) != stored:
            raise ChecksumMismatch(f"chunk file {os.fspath(path)} fails its crc32c checksum")
        data = payload.view(self.dtype).reshape(self.chunks)
        if extent != self.chunks:
            data = np.ascontiguousarray(data[tuple(slice(0, e) for e in extent)])
        return data


class GuardedChunks:
    """Array-like over a zarr array that names artifact and array when a chunk is corrupt.

    Whole-chunk reads of raw local arrays take :class:`RawChunkReader`; all others zarr,
    through a :class:`GuardedStore`. A chunk that fails its checksum or is missing (unless
    ``sparse``) raises :class:`CorruptChunkError`.
    """

    def __init__(self, array: zarr.Array, artifact: str, name: str, sparse: bool = False):
        self.array = guarded_array(array, artifact, (array.basename,) if sparse else ())
        self.artifact, self.name = artifact, name
        self.shape, self.ndim = array.shape, array.ndim
        self.dtype = (
            np.dtype("O") if isinstance(array.dtype, np.dtypes.StringDType) else array.dtype
        )
        self.raw = RawChunkReader.for_array(array, sparse)

    def __getitem__(self, key: Any) -> np.ndarray:
        coords = self.raw.chunk_coords(key) if self.raw is not None else None
        try:
            if coords is not None:
                return self.raw.read(coords)
            return self.array[key]
        except MissingChunk as missing:
            raise missing_chunk_error(self.artifact, self.name, missing.args[0]) from None
        except ValueError as error:
            if not _is_checksum_failure(error):
                raise
            where = (
                in_selection(key)
                if coords is None
                else f"chunk {self.raw.encode_chunk_key(coords)}"
            )
            raise checksum_error(self.artifact, self.name, where) from error


def dask_array(array: zarr.Array, artifact: str, name: str, sparse: bool = False) -> da.Array:
    """A dask array over the stored chunks that names artifact and array on corruption."""
    guarded = GuardedChunks(array, artifact, name, sparse)
    return da.from_array(
        guarded,
        chunks=array.chunks,
        name=f"{artifact}-{name}",
        asarray=False,
        meta=np.empty((0,) * array.ndim, dtype=guarded.dtype),
    )
