"""Writing one artifact: staging, per-block progress, validation, commit.

Lifecycle (DESIGN.md, "The lake contract")::

    writer = lake.begin(kind, config, inputs)     # new, resumed from staging, or already complete
    if not writer.complete:
        writer.create_array(...)                  # idempotent: a resumed writer gets the array back
        progress = writer.progress("blocks", n)   # one uint8 per block, one chunk per block
        for block in progress.pending(): ...; progress.mark_done(block)
        writer.commit()                           # validate, consolidate + status=complete, rename

Every task of a pipeline owns whole chunks of the arrays it writes and marks its own progress
block, so a killed pipeline, rerun, recomputes only the blocks not marked done.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from curvlake.errors import LakeError, SchemaError
from curvlake.lake._chunks import chunk_problems
from curvlake.storage_schema import ArrayInfo, ArtifactSpec, validate_arrays

if TYPE_CHECKING:
    from curvlake.lake._lake import Lake

NS = "curvlake:"
STATUS, KIND, VERSION, PROVENANCE = (
    NS + "status",
    NS + "kind",
    NS + "schema_version",
    NS + "provenance",
)
#: Set on artifacts whose writer stores every chunk (all written since this attribute exists);
#: in older artifacts a chunk equal to the fill value was not stored, and reads as the fill.
ALL_CHUNKS = NS + "all_chunks"
PROGRESS_GROUP = "_progress"
#: Scratch and state arrays of a pipeline, kept in staging while it runs (for resume), removed
#: at commit.
WORK_GROUP = "_work"
# zarr skips chunks equal to the fill value by default; a complete artifact stores every chunk,
# so that a missing one is corruption, never a fill value (DESIGN.md, "The lake contract").
# The setting is not stored with the array: it is set on every array a writer hands out.
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}

warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


def compressors_for(dtype: np.dtype, compress: bool) -> tuple:
    """Codecs of a stored chunk: optional zstd, then always a crc32c checksum.

    Gradient and weight mantissas barely compress, so float data is stored uncompressed by
    default (benchmarks/lake_io.py); the checksum makes corruption an error, not silent.
    """
    return (ZstdCodec(level=1), Crc32cCodec()) if compress else (Crc32cCodec(),)


def create_work_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    dtype: Any,
    *,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """A scratch or state array in a work group (:meth:`ArtifactWriter.work_group`): checksummed
    (crc32c) and with every chunk written, like the artifact's own arrays."""
    shape = tuple(int(s) for s in shape)
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=tuple(chunks) if chunks else tuple(max(1, s) for s in shape),
        compressors=compressors_for(np.dtype(dtype), False),
        config=WRITE_ALL_CHUNKS,
        overwrite=overwrite,
    )


def write_regions(regions: Sequence[tuple[zarr.Array, Any, Any]]) -> None:
    """Write ``array[selection] = value`` for every ``(array, selection, value)`` concurrently.

    One round trip to the store instead of one per array: a training epoch's statistics rows
    (half a dozen small arrays) cost a few milliseconds, not a few per array. The writes are
    independent, so their order does not matter; a caller that needs one written last (a done
    flag) writes it after this returns.
    """

    async def all_writes() -> None:
        await asyncio.gather(
            *(
                array._async_array.setitem(selection, np.asarray(value))
                for array, selection, value in regions
            )
        )

    sync(all_writes())


def array_infos(group: zarr.Group) -> dict[str, ArrayInfo]:
    """Dims, shape and dtype of every array directly in ``group``."""
    infos = {}
    for name, array in group.arrays():
        dims = array.metadata.dimension_names or tuple(f"dim_{i}" for i in range(array.ndim))
        dtype = array.dtype
        infos[name] = ArrayInfo(
            tuple(dims),
            tuple(array.shape),
            np.dtype(dtype) if not isinstance(dtype, np.dtypes.StringDType) else np.dtype("O"),
        )
    return infos


class BlockProgress:
    """Which blocks of a pipeline are done: a uint8 array with one chunk per block.

    Picklable (the zarr array pickles as its store path), so a Dask task marks its own block
    after writing its chunks; the mark lands in a chunk no other task touches.
    """

    def __init__(self, array: zarr.Array):
        self.array = array

    @property
    def n_blocks(self) -> int:
        return int(self.array.shape[0])

    def done(self) -> np.ndarray:
        """Boolean mask of finished blocks."""
        return np.asarray(self.array[:]).astype(bool)

    def pending(self) -> list[int]:
        """Indices of blocks still to compute, in order."""
        return [int(i) for i in np.flatnonzero(~self.done())]

    def mark_done(self, block: int) -> None:
        self.array[block] = 1


class ArtifactWriter:
    """Writes one artifact into ``<lake>/_staging/<id>`` and commits it into place."""

    def __init__(
        self,
        lake: Lake,
        spec: ArtifactSpec,
        artifact_id: str,
        config: Mapping[str, Any],
        inputs: Sequence[str],
        complete: bool,
    ):
        self.lake = lake
        self.spec = spec
        self.id = artifact_id
        self.config = dict(config)
        self.inputs = list(inputs)
        self.complete = complete
        self.resumed = False
        self._group: zarr.Group | None = None

    # -- setup -------------------------------------------------------------------------------

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """An error while writing marks the staged artifact failed (kept for resume), then
        propagates."""
        if exc is not None and not self.complete:
            self.fail(f"{exc_type.__name__}: {exc}")
        return False

    @property
    def url(self) -> str:
        """Where the artifact is being written (the staging group)."""
        return self.lake._staging_url(self.id)

    @property
    def group(self) -> zarr.Group:
        if self.complete:
            raise LakeError(f"artifact {self.id} is already complete; open it with lake.open()")
        if self._group is None:
            raise LakeError(f"artifact {self.id}: writer was not started")
        return self._group

    def _start(self, provenance: dict[str, Any]) -> None:
        existing = self.lake._exists(self.url + "/zarr.json")
        if existing:
            group = zarr.open_group(self.url, mode="r+", zarr_format=3, use_consolidated=False)
            self.resumed = True
        else:
            group = zarr.open_group(self.url, mode="w", zarr_format=3)
            group.attrs.update(
                {
                    KIND: self.spec.kind,
                    VERSION: self.spec.version,
                    PROVENANCE: provenance,
                    ALL_CHUNKS: True,
                }
            )
        group.attrs[STATUS] = "writing"
        self._group = group

    # -- arrays ------------------------------------------------------------------------------

    def create_array(
        self,
        name: str,
        shape: Sequence[int],
        dtype: Any = None,
        *,
        chunks: Sequence[int] | None = None,
        fill_value: Any = None,
        compress: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> zarr.Array:
        """Create array ``name`` of the kind's schema (dims and chunking from the spec).

        On a resumed writer the existing array is returned after checking it matches.
        """
        spec = self.spec.array(name)
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(spec.dims):
            raise SchemaError(
                f"{self.spec.kind}.{name} has dims {spec.dims}; got a shape of rank {len(shape)}"
            )
        dtype = np.dtype(dtype or spec.storage_dtype()) if spec.dtype != "str" else str
        if spec.dtype != "str" and not spec.accepts_dtype(dtype):
            raise SchemaError(f"{self.spec.kind}.{name} must be {spec.dtype}, got {dtype}")
        if name in self.group.array_keys():
            array = self.group[name]
            if tuple(array.shape) != shape:
                raise LakeError(
                    f"artifact {self.id}: staged array {name!r} has shape {array.shape}, "
                    f"this run wants {shape}; remove the stale staging with `curvlake lake gc`"
                )
            return array.with_config(WRITE_ALL_CHUNKS)
        return self.group.create_array(
            name, **self._creation_kwargs(name, shape, dtype, chunks, fill_value, compress, attrs)
        )

    def _creation_kwargs(self, name, shape, dtype, chunks, fill_value, compress, attrs) -> dict:
        spec = self.spec.array(name)
        itemsize = 8 if dtype is str else np.dtype(dtype).itemsize
        chunks = tuple(chunks) if chunks else spec.chunking(shape, itemsize, self.lake.chunk_bytes)
        if fill_value is None and dtype is not str and np.issubdtype(dtype, np.floating):
            fill_value = np.nan  # unwritten float chunks read as NaN, never as plausible zeros
        return {
            "shape": shape,
            "dtype": dtype,
            "chunks": chunks,
            "dimension_names": spec.dims,
            "fill_value": fill_value,
            "compressors": compressors_for(dtype, compress),
            "attributes": dict(attrs or {}),
            "config": WRITE_ALL_CHUNKS,
        }

    def write(self, name: str, data: Any, **kwargs: Any) -> zarr.Array:
        """Create array ``name`` and write all of ``data`` into it (small arrays)."""
        data = np.asarray(data)
        dtype = None if data.dtype.kind in "OUT" else data.dtype
        array = self.create_array(name, data.shape, dtype, **kwargs)
        array[...] = data
        return array

    def write_many(self, arrays: Mapping[str, Any]) -> None:
        """Create and fill several small arrays concurrently (one round trip to the store).

        Each small array costs a few milliseconds of store latency when written on its own;
        a run has about 25 of them.
        """
        existing = set(self.group.array_keys())
        jobs = []
        for name, data in arrays.items():
            data = np.asarray(data)
            if name in existing:
                self.write(name, data)
                continue
            spec = self.spec.array(name)
            if data.ndim != len(spec.dims):
                raise SchemaError(
                    f"{self.spec.kind}.{name} has dims {spec.dims}; got shape {data.shape}"
                )
            dtype = str if spec.dtype == "str" else np.dtype(data.dtype)
            if dtype is not str and not spec.accepts_dtype(dtype):
                raise SchemaError(f"{self.spec.kind}.{name} must be {spec.dtype}, got {dtype}")
            kwargs = self._creation_kwargs(name, data.shape, dtype, None, None, False, None)
            jobs.append((name, data, kwargs))

        async def create_and_fill(name: str, data: np.ndarray, kwargs: dict) -> None:
            array = await self.group._async_group.create_array(name, **kwargs)
            if data.size:
                await array.setitem(tuple(slice(None) for _ in data.shape), data)

        async def all_jobs() -> None:
            await asyncio.gather(*(create_and_fill(*job) for job in jobs))

        sync(all_jobs())

    def set_attrs(self, **attrs: Any) -> None:
        """Kind-specific attributes of the artifact group."""
        self.group.attrs.update(attrs)

    def progress(self, name: str, n_blocks: int) -> BlockProgress:
        """The progress record of a blocked computation (created, or found on resume)."""
        progress_group = self.group.require_group(PROGRESS_GROUP)
        if name in progress_group.array_keys():
            array = progress_group[name]
            if array.shape != (n_blocks,):
                raise LakeError(
                    f"artifact {self.id}: staged progress {name!r} has {array.shape[0]} blocks, "
                    f"this run has {n_blocks}; remove the stale staging with `curvlake lake gc`"
                )
            array = array.with_config(WRITE_ALL_CHUNKS)
        else:
            array = progress_group.create_array(
                name,
                shape=(n_blocks,),
                chunks=(1,),
                dtype="uint8",
                fill_value=0,
                compressors=None,
                config=WRITE_ALL_CHUNKS,
            )
        return BlockProgress(array)

    def work_group(self, name: str) -> zarr.Group:
        """The scratch / state group ``name`` of the staged artifact (created, or found on
        resume). Create its arrays with :func:`create_work_array`; it is removed at commit."""
        return self.group.require_group(WORK_GROUP).require_group(name)

    # -- commit ------------------------------------------------------------------------------

    def commit(self) -> str:
        """Validate, consolidate with ``status=complete``, and move the artifact into place.

        Refuses (LakeError) when blocks are not done, when an array lacks chunks (a task that
        did not write what it owns; checked from one listing, no chunk is read), or when the
        arrays do not match the kind's schema.
        """
        group = self.group
        if PROGRESS_GROUP in group.group_keys():
            for name, array in group[PROGRESS_GROUP].arrays():
                missing = int(array.shape[0] - np.count_nonzero(array[:]))
                if missing:
                    raise LakeError(
                        f"artifact {self.id}: cannot commit, {missing} block(s) of {name!r} "
                        "are not done"
                    )
            del group[PROGRESS_GROUP]
        if WORK_GROUP in group.group_keys():
            del group[WORK_GROUP]
        infos = array_infos(group)
        attrs = dict(group.attrs)
        validate_arrays(self.spec, infos, attrs, where=f"artifact {self.id}")
        problems = chunk_problems(
            dict(group.arrays()),
            self.lake._stored_files(self.url),
            self.lake._sparse_arrays(dict(group.attrs)),
        )
        if problems:
            raise LakeError(
                f"artifact {self.id}: cannot commit, chunks were not written: "
                + "; ".join(problems)
            )
        coords = [c for c in self.spec.coords() if c in infos]
        group.attrs.update({"coordinates": " ".join(coords), STATUS: "complete"})
        zarr.consolidate_metadata(group.store, path=group.path, zarr_format=3)
        self.lake._publish(self.id)
        self.complete = True
        self._group = None
        return self.id

    def fail(self, message: str) -> None:
        """Mark the staged artifact failed (it stays in staging to be resumed or collected)."""
        if self._group is not None:
            self._group.attrs.update({STATUS: "failed", NS + "error": message})
        self.lake._release(self.id)


def new_provenance(
    config: Mapping[str, Any],
    inputs: Sequence[str],
    config_hash: str,
    sources: Mapping[str, str] | None = None,
) -> dict:
    """Provenance attributes of a new artifact."""
    from curvlake import __version__

    return {
        "package_version": __version__,
        "config": json.loads(json.dumps(config)),
        "config_hash": config_hash,
        "inputs": list(inputs),
        "sources": dict(sources or {}),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
