"""The inputs of the comparisons, read once and checked for compatibility at the boundary.

Two artifacts are compared only when they describe the same thing: the same run and
checkpoint, the same parameter space (layer tables with the same names and shapes), the same
examples. Each check raises a one-line :class:`~curvlake.errors.UserInputError` naming both
artifacts and what differs, before anything is staged.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from curvlake.errors import ArtifactNotFoundError, UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.skeleton import require_artifact


@dataclass(frozen=True)
class Eigenspace:
    """The top-k eigenpairs of a ``hessian_eigs`` artifact.

    Attributes:
        id: the artifact.
        run: its run.
        checkpoint: the run's checkpoint index.
        eigenvalues: ``(k,)`` by ``|λ|`` descending.
        vectors: ``U`` (P x k) with orthonormal columns, lazy (chunked along ``param``).
        space: its parameter space.
    """

    id: str
    run: str
    checkpoint: int
    eigenvalues: np.ndarray
    vectors: da.Array
    space: ParameterSpace

    @property
    def k(self) -> int:
        return int(self.eigenvalues.size)


@dataclass(frozen=True)
class ParameterSpace:
    """The layer table an artifact's parameter axis follows: names and shapes of the tensors."""

    owner: str
    names: tuple[str, ...]
    shapes: tuple[str, ...]
    n_params: int

    def check_same(self, other: ParameterSpace) -> None:
        """Raise unless ``other`` is the same parameter space."""
        mine, theirs = (
            list(zip(self.names, self.shapes, strict=True)),
            list(zip(other.names, other.shapes, strict=True)),
        )
        if mine == theirs:
            return
        differ = next(
            (
                f"{a} ({sa}) vs {b} ({sb})"
                for (a, sa), (b, sb) in zip(mine, theirs, strict=False)
                if a != b or sa != sb
            ),
            f"{len(mine)} vs {len(theirs)} tensors",
        )
        raise UserInputError(
            f"{self.owner} and {other.owner} index different parameter spaces ({self.n_params} vs "
            f"{other.n_params} parameters; first difference: {differ})"
        )


def parameter_space(lake: Lake, artifact: str) -> ParameterSpace:
    """The parameter space of an artifact with a layer table (run, mask, hessian_eigs, ...)."""
    group = lake.group(artifact)
    names = tuple(str(n) for n in group["layer"][:])
    shapes = tuple(str(s) for s in group["layer_shape"][:])
    return ParameterSpace(artifact, names, shapes, int(np.sum(group["layer_size"][:])))


def eigenspace(lake: Lake, eigs_id: str, role: str = "hessian_eigs") -> Eigenspace:
    """The eigenpairs of a complete ``hessian_eigs`` artifact."""
    require_artifact(lake, eigs_id, "hessian_eigs", role=role)
    ds = lake.open(eigs_id)
    return Eigenspace(
        id=eigs_id,
        run=str(ds.attrs["run"]),
        checkpoint=int(ds.attrs["checkpoint"]),
        eigenvalues=np.asarray(ds["eigenvalues"].values, dtype=np.float64),
        vectors=ds["eigenvectors"].data,
        space=parameter_space(lake, eigs_id),
    )


def checkpoint_epoch(lake: Lake, run_id: str, checkpoint: int) -> int:
    """The epoch of a run's checkpoint; -1 when the run is not in the lake."""
    try:
        return int(lake.group(run_id)["checkpoint_epoch"][checkpoint])
    except ArtifactNotFoundError:
        return -1


def lineage_run(lake: Lake, artifact: str) -> str | None:
    """The run an artifact was computed from: the first ``run`` among its inputs, their inputs
    and so on (breadth first; inputs removed from the lake are skipped); None when there is
    none."""
    queue, seen = [artifact], set()
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        try:
            info = lake.info(current)
        except ArtifactNotFoundError:
            continue
        if info.kind == "run" and current != artifact:
            return current
        queue += info.inputs
    return None


def check_equal(what: str, first: tuple[str, object], second: tuple[str, object]) -> None:
    """Raise unless two artifacts agree on ``what`` (``(artifact, value)`` each)."""
    if first[1] != second[1]:
        raise UserInputError(
            f"{first[0]} and {second[0]} are not of the same {what}: {first[1]} vs {second[1]}"
        )
