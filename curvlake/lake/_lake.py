"""The lake: a directory (or fsspec URL) of Zarr v3 artifact groups."""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from curvlake.errors import (
    ArtifactNotFoundError,
    CorruptChunkError,
    IncompleteArtifactError,
    LakeError,
    SchemaError,
    UserInputError,
)
from curvlake.lake._artifact import (
    ALL_CHUNKS,
    KIND,
    PROVENANCE,
    STATUS,
    VERSION,
    ArtifactWriter,
    array_infos,
    new_provenance,
)
from curvlake.lake._chunks import (
    GuardedGroup,
    GuardedStore,
    chunk_problems,
    dask_array,
    rm_hint,
)
from curvlake.lake._ids import artifact_id, canonical_config, config_hash, kind_of
from curvlake.storage_schema import DEFAULT_CHUNK_BYTES, SPECS, get_spec, validate_arrays

if TYPE_CHECKING:
    import xarray as xr

#: errno values of a write refused by permissions or a read-only file system.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

LAKE_FORMAT = "curvlake-lake"
LAKE_FORMAT_VERSION = "1.0"
MARKER = "lake.json"
STAGING = "_staging"


@dataclass(frozen=True)
class ArtifactInfo:
    """One line of the catalog."""

    id: str
    kind: str
    status: str
    created_at: str
    inputs: list[str]
    config: dict[str, Any] = field(repr=False)
    url: str = field(repr=False)
    schema_version: str = ""
    all_chunks: bool = field(default=False, repr=False)

    @property
    def config_summary(self) -> str:
        """``key=value`` pairs of the config entries that identify the artifact, for listings."""
        keys = get_spec(self.kind).summary_keys if self.kind in SPECS else ()
        if keys:
            items = [(k, self.config[k]) for k in keys if k in self.config]
        else:
            items = [
                (k, v) for k, v in self.config.items() if isinstance(v, (str, int, float, bool))
            ]
        return " ".join(
            f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
            for k, v in items
        )


class Lake:
    """A curvlake lake. Open one with :func:`open_lake`."""

    def __init__(self, url: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.fs, root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        self.url = self.root if self.local else url.rstrip("/")
        self.chunk_bytes = chunk_bytes

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    # -- paths -------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _url(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def _staging_url(self, artifact: str) -> str:
        # Object stores cannot rename: there the artifact is written in place and its status
        # attribute (written last) is the commit marker.
        return self._url(STAGING, artifact) if self.local else self._final_url(artifact)

    def _final_url(self, artifact: str) -> str:
        return self._url(kind_of(artifact), artifact)

    def _exists(self, url: str) -> bool:
        return self.fs.exists(url if self.local else fsspec.core.url_to_fs(url)[1])

    def _stored_files(self, url: str) -> dict[str, int]:
        """Size of every file under the group at ``url``, by path relative to it (one listing,
        no file is read)."""
        if self.local:
            files: dict[str, int] = {}
            start = len(url.rstrip("/")) + 1
            folders = [url]
            while folders:
                with os.scandir(folders.pop()) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
                        else:
                            files[entry.path[start:]] = entry.stat().st_size
            return files
        root = fsspec.core.url_to_fs(url)[1].rstrip("/") + "/"
        found = self.fs.find(root, detail=True)
        return {p[len(root) :]: int(i["size"]) for p, i in found.items() if p.startswith(root)}

    # -- catalog -----------------------------------------------------------------------------

    def list(self, kind: str | None = None, **attr_filters: Any) -> list[ArtifactInfo]:
        """Artifacts of the lake, complete ones and those in staging, oldest first.

        Args:
            kind: only this kind.
            **attr_filters: keep artifacts whose config has ``name == value`` (dotted names reach
                into nested entries, e.g. ``model_params.k=8``).
        """
        if kind is not None:
            get_spec(kind)
        found: dict[str, ArtifactInfo] = {}
        # Placed artifacts first, so a staged copy never hides a complete one.
        markers = sorted(
            self.fs.glob(self._path("*", "*", "zarr.json")),
            key=lambda m: m.split("/")[-3] == STAGING,
        )
        for marker in markers:
            art = marker.split("/")[-2]
            if art in found:
                continue
            info = self._read_info(marker, art)
            if info is not None and (kind is None or info.kind == kind):
                found[art] = info
        infos = [i for i in found.values() if _matches(i, attr_filters)]
        return sorted(infos, key=lambda i: (i.created_at, i.id))

    def _read_info(self, marker: str, art: str) -> ArtifactInfo | None:
        try:
            attrs = json.loads(self.fs.cat_file(marker)).get("attributes", {})
        except (OSError, json.JSONDecodeError):
            return None
        if KIND not in attrs:
            return None
        provenance = attrs.get(PROVENANCE, {})
        return ArtifactInfo(
            id=art,
            kind=attrs[KIND],
            status=attrs.get(STATUS, "unknown"),
            created_at=provenance.get("created_at", ""),
            inputs=provenance.get("inputs", []),
            config=provenance.get("config", {}),
            url=marker.rsplit("/", 1)[0] if self.local else self._final_url(art),
            schema_version=attrs.get(VERSION, ""),
            all_chunks=bool(attrs.get(ALL_CHUNKS)),
        )

    def info(self, artifact: str) -> ArtifactInfo:
        """Catalog entry of one artifact (complete or staged)."""
        for url in (self._final_url(artifact), self._url(STAGING, artifact)):
            marker = url + "/zarr.json"
            path = marker if self.local else fsspec.core.url_to_fs(marker)[1]
            if self.fs.exists(path):
                info = self._read_info(path, artifact)
                if info is not None:
                    return info
        raise ArtifactNotFoundError(
            f"no artifact {artifact!r} in lake {self.url} (list them with `curvlake lake ls`)"
        )

    # -- reading -----------------------------------------------------------------------------

    def group(self, artifact: str) -> zarr.Group:
        """The zarr group of a complete artifact (checked: complete, compatible schema).

        The group is read-only and reading its arrays raises CorruptChunkError naming artifact
        and array when a chunk fails its checksum or is missing (every chunk of a complete
        artifact is stored; only arrays the spec declares ``sparse`` read absent chunks as the
        fill value).
        """
        info = self.info(artifact)
        if info.status != "complete":
            where = "staging" if self.local else "place"
            raise IncompleteArtifactError(
                f"artifact {artifact} is not complete (status: {info.status}, in {where}); "
                "rerun the command that makes it to resume, or `curvlake lake gc` to remove it"
            )
        spec = get_spec(info.kind)
        try:
            major = int(str(info.schema_version).split(".")[0])
        except ValueError:
            major = -1
        if major != spec.major:
            raise SchemaError(
                f"artifact {artifact} has {info.kind} schema version "
                f"{info.schema_version or 'none'}, "
                f"this curvlake reads version {spec.major}.x; use a matching curvlake version"
            )
        url = self._final_url(artifact)
        store = (
            LocalStore(url, read_only=True)
            if self.local
            else FsspecStore.from_url(url, read_only=True)
        )
        group = zarr.open_group(
            GuardedStore(
                store, artifact, self._sparse_arrays({KIND: info.kind, ALL_CHUNKS: info.all_chunks})
            ),
            mode="r",
            zarr_format=3,
        )
        return GuardedGroup(group._async_group)

    def open(self, artifact: str) -> xr.Dataset:
        """A lazy, dask-backed xarray Dataset of a complete artifact.

        Chunks are the stored chunks; a corrupted chunk raises CorruptChunkError naming the
        artifact and array when it is read.
        """
        import xarray as xr  # lazily: workers that only write arrays need not load pandas

        group = self.group(artifact)
        attrs = dict(group.attrs)
        sparse = self._sparse_arrays(attrs)
        coord_names = set(attrs.pop("coordinates", "").split())
        variables, coords = {}, {}
        for name, array in group.arrays():
            dims = array.metadata.dimension_names
            values = dask_array(array, artifact, name, sparse=name in sparse)
            variable = xr.Variable(dims, values, attrs=dict(array.attrs))
            (coords if name in coord_names or name in dims else variables)[name] = variable
        return xr.Dataset(variables, coords=coords, attrs=attrs)

    def validate(self, artifact: str, check_chunks: bool = True) -> None:
        """Check a complete artifact: its schema, that every chunk is stored (and, for raw
        arrays, has the right size), and, with ``check_chunks``, every chunk's checksum.

        Without ``check_chunks`` only metadata and one listing of the artifact are read.

        Raises:
            SchemaError: the arrays or attributes do not match the kind's schema.
            CorruptChunkError: a chunk is missing, has the wrong size or fails its checksum.
        """
        group = self.group(artifact)
        spec = get_spec(group.attrs[KIND])
        validate_arrays(spec, array_infos(group), dict(group.attrs), where=f"artifact {artifact}")
        problems = self._chunk_problems(artifact, group)
        if problems:
            raise CorruptChunkError(
                f"artifact {artifact}: " + "; ".join(problems) + f"; {rm_hint(artifact)}"
            )
        if check_chunks:
            sparse = self._sparse_arrays(dict(group.attrs))
            blocks = [
                dask_array(array, artifact, name, sparse=name in sparse).map_blocks(
                    _nothing, dtype=bool
                )
                for name, array in group.arrays()
                if array.size
            ]
            da.compute(*blocks)

    def _chunk_problems(self, artifact: str, group: zarr.Group) -> list[str]:
        """Missing (or, for raw arrays, wrongly sized) chunks, from one listing."""
        return chunk_problems(
            dict(group.arrays()),
            self._stored_files(self._final_url(artifact)),
            self._sparse_arrays(dict(group.attrs)),
        )

    @staticmethod
    def _sparse_arrays(attrs: Mapping[str, Any]) -> Collection[str]:
        """Arrays whose absent chunks read as the fill value: those the kind's spec declares
        sparse; every array of an artifact written before every chunk was stored (legacy,
        no ``curvlake:all_chunks`` attribute), whose writer skipped fill-valued chunks."""
        if not attrs.get(ALL_CHUNKS):
            return _EVERY_ARRAY
        return get_spec(attrs[KIND]).sparse_arrays()

    # -- writing -----------------------------------------------------------------------------

    def begin(
        self,
        kind: str,
        config: Mapping[str, Any],
        inputs: Sequence[str] = (),
        *,
        sources: Mapping[str, str] | None = None,
    ) -> ArtifactWriter:
        """Start (or resume, or find complete) the artifact of ``kind`` for ``config`` + inputs.

        ``sources``: files the config was read from (``{role: "path sha256:<hex>"}``), recorded
        in the provenance; their contents already determine the config, and so the id.
        """
        spec = get_spec(kind)
        config = canonical_config(config)
        inputs = list(inputs)
        for input_id in inputs:
            if self.info(input_id).status != "complete":
                raise IncompleteArtifactError(f"input artifact {input_id} is not complete")
            self._check_stored(input_id, role="input artifact")
        art = artifact_id(kind, config, inputs)
        if self._is_complete(art):
            self._check_stored(art)
            return ArtifactWriter(self, spec, art, config, inputs, complete=True)
        writer = ArtifactWriter(self, spec, art, config, inputs, complete=False)
        self._require_writable(STAGING, kind)
        try:
            self._acquire(art)
            writer._start(new_provenance(config, inputs, config_hash(config), sources))
        except OSError as error:
            if error.errno not in _NOT_WRITABLE:
                raise
            raise LakeError(f"cannot write to the lake at {self.url}: {error.strerror}") from None
        return writer

    def _require_writable(self, *parts: str) -> None:
        """Refuse a local lake this process cannot write to, before anything is written (the
        lake's folder and the existing folders among ``parts``, relative to it)."""
        if not self.local:
            return
        for folder in (self.root, *(self._path(part) for part in parts)):
            if os.path.isdir(folder) and not os.access(folder, os.W_OK):
                read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
                reason = "read-only file system" if read_only else "permission denied"
                where = "" if folder == self.root else f" ({folder})"
                raise LakeError(f"cannot write to the lake at {self.url}: {reason}{where}")

    def _check_stored(self, artifact: str, role: str = "artifact") -> None:
        """Cheap integrity check of a complete artifact that is about to be reused or read:
        schema and chunk presence from its metadata and one listing (no checksum pass)."""
        group = self.group(artifact)  # an incompatible schema version raises here, as on reads
        spec = get_spec(group.attrs[KIND])
        error_type: type[LakeError] = CorruptChunkError
        try:
            validate_arrays(spec, array_infos(group), dict(group.attrs), where="its metadata")
            problems = self._chunk_problems(artifact, group)
        except SchemaError as error:
            error_type, problems = SchemaError, [str(error)]
        if problems:
            raise error_type(
                f"{role} {artifact} is stored but damaged ({'; '.join(problems)}); remove it "
                f"with `curvlake lake rm {artifact}` and rerun"
            )

    def _is_complete(self, artifact: str) -> bool:
        try:
            return self.info(artifact).status == "complete" and self._exists(
                self._final_url(artifact) + "/zarr.json"
            )
        except ArtifactNotFoundError:
            return False

    def _lock_path(self, artifact: str) -> str:
        return self._path(STAGING, artifact + ".lock")

    def _acquire(self, artifact: str) -> None:
        """Refuse to write an artifact that a live process on this host is writing."""
        if not self.local:
            return
        Path(self._path(STAGING)).mkdir(parents=True, exist_ok=True)
        lock = Path(self._lock_path(artifact))
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder != me and _alive(holder):
                raise LakeError(
                    f"artifact {artifact} is being written by process {holder.get('pid')} on "
                    f"{holder.get('host')}; wait for it to finish (if that process is gone, "
                    f"delete {lock} and rerun)"
                ) from None
            lock.write_text(json.dumps(me))
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(me))

    def _release(self, artifact: str) -> None:
        if self.local:
            Path(self._lock_path(artifact)).unlink(missing_ok=True)

    def _publish(self, artifact: str) -> None:
        """Move a committed artifact from staging into ``<kind>/`` (atomic rename on POSIX)."""
        if self.local:
            final = Path(self._path(kind_of(artifact), artifact))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path(STAGING, artifact), final)
        self._release(artifact)

    # -- maintenance -------------------------------------------------------------------------

    def dependents(self, artifact: str) -> list[str]:
        """Every artifact computed (directly or not) from ``artifact``, dependents first.

        An artifact depends on the ones its provenance lists as ``inputs``; complete and staged
        artifacts count.
        """
        users: dict[str, list[str]] = {}
        for info in self.list():
            for input_id in info.inputs:
                users.setdefault(input_id, []).append(info.id)
        ordered: list[str] = []

        def visit(art: str) -> None:
            for user in users.get(art, []):
                if user not in ordered:
                    visit(user)
                    ordered.append(user)

        visit(artifact)
        return ordered

    def remove(self, artifact: str, recursive: bool = False, dry_run: bool = False) -> list[str]:
        """Remove a complete or staged artifact (to recompute a damaged one, or free space).

        Args:
            artifact: the artifact id.
            recursive: also remove every artifact computed from it, dependents first.
            dry_run: only return what would be removed.

        Returns:
            The ids removed (or that would be), ``artifact`` last.

        Raises:
            ArtifactNotFoundError: no such artifact.
            LakeError: other artifacts were computed from it and ``recursive`` is false, or a
                live process is writing one of them.
        """
        self.info(artifact)
        dependents = self.dependents(artifact)
        if dependents and not recursive:
            raise LakeError(
                f"artifact {artifact} is an input of {', '.join(dependents)}; remove them too "
                f"with `curvlake lake rm {artifact} --recursive`"
            )
        doomed = [*dependents, artifact]
        for art in doomed:
            holder = self._lock_holder(art)
            if holder is not None:
                raise LakeError(
                    f"artifact {art} is being written by process {holder.get('pid')} on "
                    f"{holder.get('host')}; stop it first, then remove the artifact"
                )
        if not dry_run:
            folders = {part for art in doomed for part in (kind_of(art), f"{kind_of(art)}/{art}")}
            self._require_writable(STAGING, *sorted(folders))
            for art in doomed:
                self._delete(art)
        return doomed

    def _lock_holder(self, artifact: str) -> dict[str, Any] | None:
        """The live process (other than this one) holding the write lock of ``artifact``."""
        if not self.local:
            return None
        try:
            holder = json.loads(Path(self._lock_path(artifact)).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        return holder if holder != me and _alive(holder) else None

    def _delete(self, artifact: str) -> None:
        """Delete the stored artifact (placed and staged copies), its marker first so that it
        leaves the catalog before its chunks go."""
        for url in (self._final_url(artifact), self._url(STAGING, artifact)):
            path = url if self.local else fsspec.core.url_to_fs(url)[1]
            if not self.fs.exists(path):
                continue
            if self.fs.exists(path + "/zarr.json"):
                self.fs.rm(path + "/zarr.json")
            self.fs.rm(path, recursive=True)
        self._release(artifact)

    def gc(self, dry_run: bool = False) -> list[str]:
        """Remove stale staging (not being written by a live process) and ``.partial`` debris.

        Complete artifacts are never touched. Returns the removed paths.
        """
        removed: list[str] = []
        if not dry_run:
            self._require_writable(STAGING)
        for path in self.fs.glob(self._path(STAGING, "*")):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".lock"):
                continue
            lock = Path(self._lock_path(name))
            if self.local and lock.exists():
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if _alive(holder):
                    continue
            removed.append(path)
            if not dry_run:
                self.fs.rm(path, recursive=True)
                if self.local:
                    lock.unlink(missing_ok=True)
        if not self.local:
            for info in self.list():
                if info.status != "complete":
                    removed.append(info.url)
                    if not dry_run:
                        self.fs.rm(fsspec.core.url_to_fs(info.url)[1], recursive=True)
        for path in self.fs.glob(self._path("**", "*.partial")):
            removed.append(path)
            if not dry_run:
                self.fs.rm(path)
        return removed


class _EveryArray(Collection[str]):
    """Contains every array name (the sparse arrays of a legacy artifact)."""

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


_EVERY_ARRAY = _EveryArray()


def _nothing(block: np.ndarray) -> np.ndarray:
    return np.zeros((1,) * block.ndim, dtype=bool)


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process recorded in a lock still runs (only knowable on this host)."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return holder.get("host") not in (None, socket.gethostname())
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _matches(info: ArtifactInfo, filters: Mapping[str, Any]) -> bool:
    for key, wanted in filters.items():
        value: Any = info.config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value != wanted:
            return False
    return True


def open_lake(url: str | os.PathLike[str], create: bool = False, **kwargs: Any) -> Lake:
    """Open the lake at a local path or fsspec URL.

    Args:
        url: a directory or an fsspec URL (``s3://bucket/lake``, ``memory://lake``...).
        create: create the lake if it does not exist.
        **kwargs: passed to :class:`Lake` (``chunk_bytes``).

    Raises:
        LakeError: the path is not a lake (and ``create`` is false), or is a lake of a newer
            incompatible format.
    """
    lake = Lake(str(url), **kwargs)
    marker = lake._path(MARKER)
    if lake.fs.exists(marker):
        try:
            meta = json.loads(lake.fs.cat_file(marker))
        except json.JSONDecodeError as error:
            raise LakeError(f"{marker} is not valid JSON: {error}") from None
        if meta.get("format") != LAKE_FORMAT:
            raise LakeError(
                f"{url} is not a curvlake lake ({marker} has format {meta.get('format')!r})"
            )
        major = str(meta.get("format_version", "0")).split(".")[0]
        if major != LAKE_FORMAT_VERSION.split(".")[0]:
            raise LakeError(
                f"lake {url} has format version {meta.get('format_version')}, this curvlake reads "
                f"{LAKE_FORMAT_VERSION.split('.')[0]}.x; upgrade curvlake to read it"
            )
        return lake
    if not create and lake.local and Path(lake.root).is_file():
        raise LakeError(f"{url} is a file, not a lake (a lake is a folder holding {MARKER})")
    if not create:
        raise LakeError(
            f"{url} is not a curvlake lake (no {MARKER}); create one with `curvlake lake init` "
            "or open_lake(path, create=True)"
        )
    if lake.local:
        existing = Path(lake.root)
        if existing.is_file():
            raise UserInputError(f"{url} is a file, not a directory")
        if existing.is_dir() and any(existing.iterdir()):
            raise LakeError(f"{url} exists, is not empty and is not a lake; choose another path")
    try:
        lake.fs.makedirs(lake.root, exist_ok=True)
        with lake.fs.open(marker, "w") as handle:
            handle.write(json.dumps({"format": LAKE_FORMAT, "format_version": LAKE_FORMAT_VERSION}))
    except OSError as error:
        if error.errno not in _NOT_WRITABLE:
            raise
        raise LakeError(f"cannot create a lake at {url}: {error.strerror}") from None
    return lake
