"""The lake: artifacts as Zarr v3 groups with a lifecycle, provenance and a catalog."""

from curvlake.lake._artifact import (
    ArtifactWriter,
    BlockProgress,
    create_work_array,
    write_regions,
)
from curvlake.lake._ids import artifact_id, config_hash, kind_of
from curvlake.lake._lake import ArtifactInfo, Lake, open_lake

__all__ = [
    "ArtifactInfo",
    "ArtifactWriter",
    "BlockProgress",
    "Lake",
    "artifact_id",
    "config_hash",
    "create_work_array",
    "kind_of",
    "open_lake",
    "write_regions",
]
