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
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import crc32c
import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from curvlake.errors import CorruptChunkError

CHECKSUM_BYTES = 4
# Smaller chunks are read into a fresh buffer instead of mapped: a mapping per tiny chunk gains
# nothing, and a result assembled from very many of them would hold one mapping each (Linux
# allows 65530 per process by default).
MAP_MIN_BYTES = 1 << 20


class ChecksumMismatch(ValueError):
    """A chunk's bytes do not match its stored crc32c (or the file has the wrong size)."""


class RawChunkReader:
    """Reads whole chunks of a local ``bytes`` + ``crc32c`` zarr v3 array without zarr's copy."""

    def __init__(self, array: zarr.Array):
        self.directory = Path(array.store_path.store.root) / array.store_path.path
        self.shape = tuple(array.shape)
        self.chunks = tuple(array.chunks)
        self.dtype = array.dtype.newbyteorder("<")
        self.fill_value = array.fill_value
        self.encode_chunk_key = array.metadata.encode_chunk_key
        self.chunk_nbytes = math.prod(self.chunks) * self.dtype.itemsize

    @classmethod
    def for_array(cls, array: zarr.Array) -> RawChunkReader | None:
        """A reader when ``array``'s chunks are raw little-endian bytes + crc32c on local disk."""
        if array.metadata.zarr_format != 3 or array.ndim == 0:
            return None
        if not isinstance(array.store_path.store, LocalStore):
            return None
        codecs = array.metadata.codecs
        if len(codecs) != 2 or not isinstance(codecs[1], Crc32cCodec):
            return None
        first = codecs[0]
        if not isinstance(first, BytesCodec):
            return None
        if getattr(first.endian, "value", first.endian) not in (None, "little"):
            return None
        native = array.dtype
        if not isinstance(native, np.dtype) or native.kind not in "biuf":
            return None
        return cls(array)

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
        """The chunk at grid ``coords``, trimmed at the array's edge; fill value if absent."""
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

    Whole-chunk reads of raw local arrays take :class:`RawChunkReader`; all others zarr.
    """

    def __init__(self, array: zarr.Array, artifact: str, name: str):
        self.array, self.artifact, self.name = array, artifact, name
        self.shape, self.ndim = array.shape, array.ndim
        self.dtype = (
            np.dtype("O") if isinstance(array.dtype, np.dtypes.StringDType) else array.dtype
        )
        self.raw = RawChunkReader.for_array(array)

    def __getitem__(self, key):
        try:
            coords = self.raw.chunk_coords(key) if self.raw is not None else None
            if coords is not None:
                return self.raw.read(coords)
            return self.array[key]
        except ValueError as error:
            if not isinstance(error, ChecksumMismatch) and "checksum" not in str(error):
                raise
            raise CorruptChunkError(
                f"artifact {self.artifact}: array {self.name!r}: a chunk in {key} failed its "
                "crc32c checksum, the stored data is corrupted; delete the artifact and "
                "recompute it"
            ) from error


def dask_array(array: zarr.Array, artifact: str, name: str) -> da.Array:
    """A dask array over the stored chunks that names artifact and array on corruption."""
    guarded = GuardedChunks(array, artifact, name)
    return da.from_array(
        guarded,
        chunks=array.chunks,
        name=f"{artifact}-{name}",
        asarray=False,
        meta=np.empty((0,) * array.ndim, dtype=guarded.dtype),
    )
