r"""Masks against eigenspaces: how much of a Hessian's top eigenspace lies in each mask.

For the orthonormal top-k eigenvectors :math:`U \in \mathbb{R}^{P \times k}` of a
``hessian_eigs`` artifact and a mask :math:`M` of :math:`m` coordinates of θ of the same run,
checkpoint and parameter space (Fernandez et al. 2025, §3)::

    overlap_M(k') = ||U[M, :k']||_F^2 / k',   k' = 1..k,      baseline_M = m / P

(:func:`curvlake.pipelines.hessian.overlap.overlap_curve`; the baseline is the expectation for
a uniformly random mask of the same size). Masks are ``mask`` artifacts (magnitude masks,
imported ones, the kept coordinates of each sparsity of a ``pruning`` artifact: M-FAC/OBS and
its magnitude baseline) and the top parameters of NPEFF components (the largest entries of a
component's row of H, or of |G| for LRM-NPEFF, as coordinates of θ). One pass over the row
blocks of U serves every mask: each block task sums ``U[M ∩ block, :]²`` per column
(:func:`~curvlake.pipelines.hessian.overlap.mask_energy_partial`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np
import scipy.sparse as sp

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.compare._inputs import (
    Eigenspace,
    check_equal,
    eigenspace,
    parameter_space,
)
from curvlake.pipelines.hessian.overlap import (
    check_mask,
    mask_energy_partial,
    overlap_curve,
    random_overlap_baseline,
)
from curvlake.pipelines.skeleton import POSITIVE_INT, as_lake, require_artifact
from curvlake.validation import validate_params

#: Default number of top parameters per NPEFF component.
N_TOP_PARAMS = 1024


@dataclass(frozen=True)
class NamedMask:
    """A mask of the comparison: its label, the artifact it comes from, what it is, its sorted
    coordinates."""

    label: str
    artifact: str
    source: str
    indices: np.ndarray


def _mask_artifact(lake: Lake, eig: Eigenspace, mask_id: str) -> NamedMask:
    info = require_artifact(lake, mask_id, "mask", role="mask")
    attrs = lake.group(mask_id).attrs
    check_equal("run", (mask_id, attrs["run"]), (eig.id, eig.run))
    if attrs["checkpoint"] is not None:
        check_equal("checkpoint", (mask_id, attrs["checkpoint"]), (eig.id, eig.checkpoint))
    parameter_space(lake, mask_id).check_same(eig.space)
    source = str(attrs["source"])
    if "chain" in info.config:  # a pruning level: the pruner's chain or its magnitude baseline
        chain = info.config["chain"]
        source += "/" + ("magnitude" if chain == "baseline" else info.config.get("method", chain))
    indices = check_mask(lake.group(mask_id)["index"][:], eig.space.n_params)
    return NamedMask(mask_id, mask_id, source, indices)


def _pruning_masks(lake: Lake, pruning_id: str) -> list[str]:
    require_artifact(lake, pruning_id, "pruning", role="pruning")
    group = lake.group(pruning_id)
    names = ("mask", "baseline_mask") if "baseline_mask" in group else ("mask",)
    return [str(m) for name in names for m in group[name][:]]


def npeff_top_parameters(lake: Lake, npeff_id: str, n_top: int) -> list[np.ndarray]:
    """Per component of an npeff artifact, the θ coordinates of its ``n_top`` largest non-zero
    entries (of H, of |G| for LRM-NPEFF), sorted ascending; ties go to the lower coordinate.

    A dense H is read once, column block by column block, keeping the running top entries of
    every component.
    """
    from curvlake.pipelines.npeff.fit import components_matrix

    H = components_matrix(lake, npeff_id)
    kept = np.asarray(lake.group(npeff_id)["kept_columns"][:], dtype=np.int64)
    if sp.issparse(H):
        H = H.tocsr()
        rows = [slice(H.indptr[j], H.indptr[j + 1]) for j in range(H.shape[0])]
        return [_top(np.abs(H.data[row]), H.indices[row], kept, n_top) for row in rows]
    best_value = np.zeros((H.shape[0], 0))
    best_column = np.zeros((H.shape[0], 0), dtype=np.int64)
    start = 0
    for b in range(H.numblocks[1]):
        block = np.abs(np.asarray(H.blocks[:, b], dtype=np.float64))
        columns = np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)
        start += block.shape[1]
        best_value = np.concatenate([best_value, block], axis=1)
        best_column = np.concatenate([best_column, columns], axis=1)
        order = np.lexsort((best_column, -best_value))[:, :n_top]
        best_value = np.take_along_axis(best_value, order, axis=1)
        best_column = np.take_along_axis(best_column, order, axis=1)
    return [_top(v, c, kept, n_top) for v, c in zip(best_value, best_column, strict=True)]


def _top(values: np.ndarray, columns: np.ndarray, kept: np.ndarray, n_top: int) -> np.ndarray:
    """θ coordinates of the ``n_top`` largest non-zero ``values`` (ties: lower column)."""
    order = np.lexsort((columns, -values))[:n_top]
    order = order[values[order] > 0]
    return np.sort(kept[columns[order]])


def _npeff_masks(lake: Lake, eig: Eigenspace, npeff_id: str, n_top: int) -> list[NamedMask]:
    require_artifact(lake, npeff_id, "npeff", role="npeff")
    attrs = lake.group(npeff_id).attrs
    pefs_id = attrs.get("pefs")
    pefs = lake.group(pefs_id).attrs if pefs_id else {}
    check_equal("run", (npeff_id, pefs.get("run")), (eig.id, eig.run))
    check_equal("checkpoint", (npeff_id, pefs.get("checkpoint")), (eig.id, eig.checkpoint))
    check_equal(
        "parameter space size",
        (npeff_id, int(attrs["n_parameters"])),
        (eig.id, eig.space.n_params),
    )
    return [
        NamedMask(f"{npeff_id}:{j}", npeff_id, "npeff", indices)
        for j, indices in enumerate(npeff_top_parameters(lake, npeff_id, n_top))
    ]


def _lake_masks(lake: Lake, eig: Eigenspace) -> tuple[list[str], list[str]]:
    """Every complete mask and npeff artifact of the eigenspace's run and checkpoint."""
    masks, npeffs = [], []
    for info in lake.list():
        if info.status != "complete" or info.kind not in ("mask", "npeff"):
            continue
        attrs = lake.group(info.id).attrs
        if info.kind == "mask":
            if attrs["run"] == eig.run and attrs["checkpoint"] in (None, eig.checkpoint):
                masks.append(info.id)
        elif attrs.get("pefs"):
            pefs = lake.group(attrs["pefs"]).attrs
            if pefs.get("run") == eig.run and pefs.get("checkpoint") == eig.checkpoint:
                npeffs.append(info.id)
    return masks, npeffs


def _energies(block: np.ndarray, masks: list[np.ndarray], start: int) -> np.ndarray:
    """Column energies of every mask restricted to one row block of U: (n_masks, k)."""
    return np.stack([mask_energy_partial(block, m, start) for m in masks])


def mask_energies(vectors, masks: list[np.ndarray]) -> np.ndarray:
    """``e[i, j] = Σ_{r ∈ M_i} U[r, j]²`` for every mask, in one pass over U's row blocks."""
    vectors = vectors.rechunk({1: -1})
    starts = np.cumsum((0, *vectors.chunks[0]))[:-1]
    shared = dask.delayed(masks, traverse=False)
    partials = [
        dask.delayed(_energies)(block, shared, int(start))
        for block, start in zip(vectors.to_delayed()[:, 0], starts, strict=True)
    ]
    return np.asarray(dask.compute(dask.delayed(sum)(partials))[0], dtype=np.float64)


@validate_params({"n_top_params": POSITIVE_INT})
def run_masks_eigenspace(
    lake: Lake | str,
    eigs_id: str,
    *,
    masks: Sequence[str] | None = None,
    pruning: Sequence[str] | None = None,
    npeff: Sequence[str] | None = None,
    n_top_params: int = N_TOP_PARAMS,
) -> str:
    """Overlap of masks with the top-k eigenspace of a ``hessian_eigs`` artifact.

    Args:
        lake: the lake (or its URL).
        eigs_id: the eigenspace.
        masks: ``mask`` artifacts.
        pruning: ``pruning`` artifacts: the kept coordinates at each of their sparsities (and
            of their magnitude baseline).
        npeff: ``npeff`` artifacts: the ``n_top_params`` top parameters of each component.
        n_top_params: coordinates per NPEFF component.

        With none of ``masks``, ``pruning``, ``npeff``: every complete mask (pruning masks
        included) and npeff artifact of the eigenspace's run and checkpoint in the lake.

    Returns:
        The ``comparison_masks`` artifact id (the same inputs give the same artifact).

    Raises:
        UserInputError: an input of another kind, run, checkpoint or parameter space (the
            message names both artifacts and what differs), or no mask at all.
    """
    lake = as_lake(lake)
    eig = eigenspace(lake, eigs_id)
    mask_ids, npeff_ids = list(masks or ()), list(npeff or ())
    for pruning_id in pruning or ():
        mask_ids += _pruning_masks(lake, pruning_id)
    if not (mask_ids or npeff_ids or pruning):
        mask_ids, npeff_ids = _lake_masks(lake, eig)
    mask_ids, npeff_ids = list(dict.fromkeys(mask_ids)), list(dict.fromkeys(npeff_ids))
    named = [_mask_artifact(lake, eig, m) for m in mask_ids]
    for npeff_id in npeff_ids:
        named += _npeff_masks(lake, eig, npeff_id, n_top_params)
    if not named:
        raise UserInputError(
            f"no mask of run {eig.run} at checkpoint {eig.checkpoint} in the lake to compare "
            f"with {eigs_id}; make one with `curvlake mask magnitude --run {eig.run} "
            f"--checkpoint {eig.checkpoint} --fraction 0.1`"
        )
    config = {"masks": mask_ids, "npeff_top": n_top_params if npeff_ids else None}
    writer = lake.begin("comparison_masks", config, [eigs_id, *mask_ids, *npeff_ids])
    if writer.complete:
        return writer.id
    with writer:
        energy = mask_energies(eig.vectors, [m.indices for m in named])
        size = np.array([m.indices.size for m in named], dtype=np.int64)
        n_params = eig.space.n_params
        writer.write_many(
            {
                "overlap": np.stack([overlap_curve(e) for e in energy]),
                "baseline": np.array([random_overlap_baseline(s, n_params) for s in size]),
                "mask_size": size,
                "mask": np.array([m.label for m in named], dtype=object),
                "mask_artifact": np.array([m.artifact for m in named], dtype=object),
                "mask_source": np.array([m.source for m in named], dtype=object),
                "sparsity": 1 - size / n_params,
                "k": np.arange(1, eig.k + 1, dtype=np.int64),
                "eigenvalue": eig.eigenvalues,
            }
        )
        writer.set_attrs(
            hessian_eigs=eigs_id,
            run=eig.run,
            checkpoint=eig.checkpoint,
            n_params=n_params,
            parameter_fingerprint=lake.group(eigs_id).attrs.get("parameter_fingerprint"),
        )
    return writer.commit()
