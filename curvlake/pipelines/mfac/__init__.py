"""M-FAC: matrix-free inverse-Fisher products, OBS pruning and the M-FAC optimizer.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021 (arXiv 2107.03356).

Layer-1 kernels:

* :mod:`curvlake.pipelines.mfac.inverse_fisher` — ``F⁻¹`` of a gradient window in
  Woodbury/Cholesky form (:class:`InverseFisher`, :class:`BlockedInverseFisher`), the
  per-chunk partial kernels a Dask graph maps over zarr chunks, and the seed's recursion as a
  reference (:func:`seed_recursion_ihvp`);
* :mod:`curvlake.pipelines.mfac.obs` — Optimal Brain Surgeon scores and updates;
* :mod:`curvlake.pipelines.mfac.optimizer` — the :class:`MFAC` torch optimizer.
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
from curvlake.pipelines.mfac.optimizer import MFAC

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
    "seed_recursion_ihvp",
    "summed_obs_update",
]
