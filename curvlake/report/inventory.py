"""The report's inventory: every artifact with its status, provenance, arrays and size on disk.

Read from metadata and one listing per artifact (no chunk is read), for complete artifacts and
for those left in staging (being written, killed or failed) alike, and for kinds this curvlake
does not know. A complete artifact of a known kind is also checked against its schema and for
missing chunks (:meth:`curvlake.lake.Lake.validate` without the checksum pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

from curvlake.errors import LakeError, SchemaError
from curvlake.lake import ArtifactInfo, Lake
from curvlake.report.commands import made_by, remedy
from curvlake.storage_schema import SPECS

_NS = "curvlake:"


@dataclass(frozen=True)
class ArrayRow:
    """One stored array: name, dimension names, shape, chunk shape, dtype."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class InventoryRow:
    """One artifact of the inventory.

    Attributes:
        info: its catalog entry (id, kind, status, created, inputs, config).
        arrays: its arrays, by name.
        bytes_on_disk: size of every stored file of the artifact.
        package_version: the curvlake version that wrote it.
        made_by: the command that made it.
        problem: why the artifact needs attention (not complete, failed, damaged, of a kind or
            schema version this curvlake cannot read); empty when it is fine.
        action: the commands that resume or clean it (empty when it is fine).
    """

    info: ArtifactInfo
    arrays: tuple[ArrayRow, ...]
    bytes_on_disk: int
    package_version: str
    made_by: str
    problem: str = ""
    action: str = ""

    @property
    def ok(self) -> bool:
        """Complete, of a known kind, and undamaged: its figures can be drawn."""
        return not self.problem


def inventory(lake: Lake, infos: list[ArtifactInfo]) -> list[InventoryRow]:
    """The inventory rows of ``infos`` (catalog entries of ``lake``), in the same order."""
    return [_row(lake, info) for info in infos]


def _row(lake: Lake, info: ArtifactInfo) -> InventoryRow:
    path = info.url if lake.local else fsspec.core.url_to_fs(info.url)[1]
    store = (
        LocalStore(info.url, read_only=True)
        if lake.local
        else FsspecStore.from_url(info.url, read_only=True)
    )
    # Staged artifacts have no consolidated metadata yet.
    consolidated = None if info.status == "complete" else False
    group = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=consolidated)
    attrs = dict(group.attrs)
    arrays = tuple(
        ArrayRow(
            name,
            tuple(array.metadata.dimension_names or ()),
            tuple(int(s) for s in array.shape),
            tuple(int(c) for c in array.chunks),
            str(array.dtype),
        )
        for name, array in sorted(group.arrays())
    )
    problem, action = _problem(lake, info, attrs)
    return InventoryRow(
        info=info,
        arrays=arrays,
        bytes_on_disk=int(lake.fs.du(path, total=True)),
        package_version=str(attrs.get(_NS + "provenance", {}).get("package_version", "")),
        made_by=made_by(info),
        problem=problem,
        action=action,
    )


def _problem(lake: Lake, info: ArtifactInfo, attrs: dict) -> tuple[str, str]:
    if info.status != "complete":
        where = "in staging" if lake.local else "in place, not committed"
        problem = f"{info.status} ({where})"
        if attrs.get(_NS + "error"):
            problem += f": {attrs[_NS + 'error']}"
        return problem, remedy(info)
    if info.kind not in SPECS:
        return (
            f"kind {info.kind!r} is unknown to this curvlake (schema version "
            f"{info.schema_version or 'none'})",
            "open it with a curvlake version that knows the kind",
        )
    try:
        lake.validate(info.id, check_chunks=False)
    except SchemaError as error:
        return str(error), "read it with the curvlake version that wrote it"
    except LakeError as error:
        return str(error), f"`curvlake lake rm {info.id}`, then rerun `{made_by(info)}`"
    return "", ""
