"""M-FAC: matrix-free inverse-Fisher products, OBS pruning and the M-FAC optimizer.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021 (arXiv 2107.03356).

Layer-1 kernels:

* :mod:`curvlake.pipelines.mfac.inverse_fisher` — ``F⁻¹`` of a gradient window in
  Woodbury/Cholesky form (:class:`InverseFisher`, :class:`BlockedInverseFisher`), the
  per-chunk partial kernels a Dask graph maps over zarr chunks, and the seed's recursion as a
  reference (:func:`seed_recursion_ihvp`);
* :mod:`curvlake.pipelines.mfac.obs` — Optimal Brain Surgeon scores and updates;
* :mod:`curvlake.pipelines.mfac.optimizer` — the :class:`MFAC` torch optimizer
  (``curvlake train --optimizer mfac``).

Pipelines on the lake:

* :mod:`curvlake.pipelines.mfac.grads` — gradient windows (``grad_window`` artifacts,
  :func:`run_grad_window`, ``curvlake mfac grads``), read back by
  :meth:`InverseFisher.from_lake` (:mod:`curvlake.pipelines.mfac.lake`);
* :mod:`curvlake.pipelines.mfac.prune` — one-shot and gradual OBS pruning vs magnitude
  (``pruning`` artifacts, :func:`run_prune_oneshot`, :func:`run_prune_gradual`,
  ``curvlake prune``), drawn by :mod:`curvlake.pipelines.mfac.plot`.

Reading windows and applying ``F⁻¹`` does not import torch (Dask workers of an out-of-core
product stay small); :class:`MFAC` and the pipelines import it when first used.
"""

from curvlake.pipelines.mfac.inverse_fisher import (
    BlockedInverseFisher,
    BlockFactors,
    InverseFisher,
    WindowFactor,
    apply_partial,
    blocked_apply_partial,
    blocked_diagonal_partial,
    blocked_factors,
    diagonal_partial,
    factor_window,
    gram_partial,
    project_partial,
    seed_recursion_ihvp,
)
from curvlake.pipelines.mfac.obs import (
    geometric_density_schedule,
    group_obs_update,
    lowest_scores,
    obs_scores,
    summed_obs_update,
)

_LAZY = {
    "MFAC": "curvlake.pipelines.mfac.optimizer",
    "run_grad_window": "curvlake.pipelines.mfac.grads",
    "run_prune_oneshot": "curvlake.pipelines.mfac.prune",
    "run_prune_gradual": "curvlake.pipelines.mfac.prune",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'curvlake.pipelines.mfac' has no attribute {name!r}")


__all__ = [
    "MFAC",
    "BlockFactors",
    "BlockedInverseFisher",
    "InverseFisher",
    "WindowFactor",
    "apply_partial",
    "blocked_apply_partial",
    "blocked_diagonal_partial",
    "blocked_factors",
    "diagonal_partial",
    "factor_window",
    "geometric_density_schedule",
    "gram_partial",
    "group_obs_update",
    "lowest_scores",
    "obs_scores",
    "project_partial",
    "run_grad_window",
    "run_prune_gradual",
    "run_prune_oneshot",
    "seed_recursion_ihvp",
    "summed_obs_update",
]
