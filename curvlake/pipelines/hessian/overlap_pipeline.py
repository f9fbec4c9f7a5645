"""Overlap of a parameter mask with a Hessian eigenspace into the lake: ``run_hessian_overlap``.

For eigenvectors ``U`` (``D × k``, a ``hessian_eigs`` artifact) and a mask ``M`` of ``m``
coordinates of the same run's θ, one pass over the row blocks of ``U`` gathers (as row-block
partials, :mod:`~curvlake.pipelines.hessian._tall`):

* the column energies ``e_j = Σ_{i∈M} U_ij²`` → ``overlap(k') = (e_1 + ... + e_k') / k'``
  (Fernandez et al. 2025), against the random baseline ``m / D``, and its IoU form
  ``ov / (2 − ov)``;
* the Gram ``U[M, :]ᵀ U[M, :]`` → the principal angles between ``span E_M`` and ``span U`` and
  the Grassmannian metrics (geodesic, chordal, projection, Fubini-Study;
  :func:`~curvlake.pipelines.hessian.overlap.grassmann_metrics`);
* for magnitude masks of global scope, the seed's nested curve (the mask of ``k'`` is the
  top-``k'`` ``|θ|``), against ``k' / D``.

``--mask magnitude[:global|:layer]`` builds the magnitude mask of the eigenpairs' checkpoint
(:func:`~curvlake.pipelines.masks.run_magnitude_mask`, ``m`` = ``mask_size``, default ``k``);
``--mask MASK_ID`` uses a stored mask, which must index the same run's parameters.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np

from curvlake.constants import HESSIAN_MAGNITUDE_MASKS
from curvlake.engine import current_client
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.hessian._tall import row_block_reduce, tall
from curvlake.pipelines.hessian.overlap import (
    grassmann_metrics,
    iou_from_overlap,
    mask_energy_partial,
    mask_gram_partial,
    nested_overlap_curve,
    overlap_curve,
    principal_angles_from_mask_gram,
    random_overlap_baseline,
    ranked_mask_energy_partial,
)
from curvlake.pipelines.masks import load_mask, run_magnitude_mask
from curvlake.pipelines.skeleton import POSITIVE_INT, as_lake, require_artifact, resolve_run
from curvlake.validation import validate_params


def _mask_rows(row_start: int, u_block: Any, mask: np.ndarray, ranked: np.ndarray | None):
    energy = mask_energy_partial(u_block, mask, row_start)
    gram = mask_gram_partial(u_block, mask, row_start)
    if ranked is None:
        return energy, gram
    return energy, gram, ranked_mask_energy_partial(u_block, ranked, row_start)


def _resolve_mask(
    lake: Lake, eigs: dict, mask: str, mask_size: int | None
) -> tuple[str, str, str | None]:
    """``(mask id, mask source, scope)``; magnitude masks are made (or found) here."""
    if mask in HESSIAN_MAGNITUDE_MASKS:
        scope = mask.partition(":")[2] or "global"
        size = eigs["k"] if mask_size is None else mask_size
        mask_id = run_magnitude_mask(
            lake, eigs["run"], checkpoint=eigs["checkpoint"], size=size, scope=scope
        )
        return mask_id, "magnitude", scope
    if mask_size is not None:
        raise UserInputError(
            f"--mask-size applies to --mask magnitude[:global|:layer] only, not to a stored "
            f"mask ({mask} has its own size)"
        )
    if not mask.startswith("mask-"):
        raise UserInputError(
            f"--mask {mask!r} is not valid: give magnitude, magnitude:global, magnitude:layer "
            "or a mask id (curvlake lake ls --kind mask)"
        )
    info = require_artifact(lake, mask, "mask", role="mask")
    attrs = dict(lake.group(mask).attrs)
    if attrs.get("run") != eigs["run"]:
        raise UserInputError(
            f"mask {mask} indexes the parameters of run {attrs.get('run')}, the eigenpairs are "
            f"of run {eigs['run']}"
        )
    if attrs.get("parameter_fingerprint") != eigs["parameter_fingerprint"]:
        raise UserInputError(
            f"mask {mask} indexes another parameter space than the eigenpairs "
            f"({attrs.get('parameter_fingerprint')} vs {eigs['parameter_fingerprint']})"
        )
    return mask, info.config.get("source", attrs.get("source", "file")), attrs.get("scope")


@validate_params({"mask_size": [None, *POSITIVE_INT]})
def run_hessian_overlap(
    lake: Lake | str, eigs_id: str, *, mask: str = "magnitude", mask_size: int | None = None
) -> str:
    """The overlap of a mask with the eigenvectors of ``eigs_id`` (a ``hessian_overlap``).

    Args:
        lake: the lake (or its URL).
        eigs_id: a complete ``hessian_eigs``.
        mask: ``magnitude`` (= ``magnitude:global``), ``magnitude:layer``, or a mask id of the
            same run.
        mask_size: ``m`` for magnitude masks (default ``k``); refused with a mask id.

    Returns:
        The ``hessian_overlap`` id (a function of the eigenpairs and the mask).
    """
    lake = as_lake(lake)
    require_artifact(lake, eigs_id, "hessian_eigs", role="eigenpairs")
    eigs = dict(lake.group(eigs_id).attrs)
    if not isinstance(mask, str):
        raise UserInputError(f"mask must be 'magnitude[:scope]' or a mask id, got {mask!r}")
    if mask in HESSIAN_MAGNITUDE_MASKS and mask_size is not None and mask_size > eigs["n_params"]:
        raise UserInputError(
            f"mask_size={mask_size} is not valid: must be at most D={eigs['n_params']}"
        )
    mask_id, source, scope = _resolve_mask(lake, eigs, mask, mask_size)
    config = {"mask_source": source, "scope": scope}
    writer = lake.begin("hessian_overlap", config, [eigs_id, mask_id])
    if writer.complete:
        return writer.id
    with writer:
        coords = load_mask(lake, mask_id).indices
        dim, k = int(eigs["n_params"]), int(eigs["k"])
        ranked = None
        if source == "magnitude" and scope == "global":
            theta = resolve_run(lake, eigs["run"], needs_data=False).theta(eigs["checkpoint"])
            ranked = np.argsort(-np.abs(theta.astype(np.float64)), kind="stable")[:k]
        current_client()
        u = tall(lake.open(eigs_id)["eigenvectors"].data, int(eigs["param_block_size"]))
        (sums,) = dask.compute(row_block_reduce(_mask_rows, [u], coords, ranked))
        curve = overlap_curve(sums[0])
        angles = principal_angles_from_mask_gram(sums[1], coords.size)
        arrays = {
            "k_prime": np.arange(1, k + 1, dtype=np.int64),
            "overlap": curve,
            "iou": iou_from_overlap(curve),
            "principal_angles": angles,
        }
        if ranked is not None:
            arrays["nested_overlap"] = nested_overlap_curve(sums[2])
            arrays["nested_baseline"] = np.arange(1, k + 1) / dim
        writer.write_many(arrays)
        metrics = grassmann_metrics(angles) if angles.size else None
        writer.set_attrs(
            eigs=eigs_id,
            mask=mask_id,
            mask_source=source,
            scope=scope,
            mask_size=int(coords.size),
            n_params=dim,
            k=k,
            baseline=random_overlap_baseline(int(coords.size), dim),
            run=eigs["run"],
            checkpoint=eigs["checkpoint"],
            epoch=eigs.get("epoch"),
            method=eigs.get("method"),
            **(metrics._asdict() if metrics else dict.fromkeys(_METRIC_NAMES)),
        )
    return writer.commit()


_METRIC_NAMES = (
    "geodesic",
    "chordal",
    "chordal_max",
    "projection",
    "projection_max",
    "fubini_study",
    "mean_cos2",
)
