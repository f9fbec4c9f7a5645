"""Eigenvalue spectra of layer covariances: intrinsic dimension, saturation, PCA projections.

For a layer with ``d`` features and covariance eigenvalues
:math:`\\lambda_1 \\ge \\dots \\ge \\lambda_d \\ge 0`, the cumulative explained variance is
:math:`p_k = \\sum_{i \\le k} \\lambda_i / \\sum_i \\lambda_i`. Richter et al. (2021) define the
intrinsic dimension as the size of the smallest eigenspace explaining a fraction ``delta`` of
the variance, and the saturation as its share of the feature space:

.. math::

    k^* = \\min\\{k : p_k \\ge \\delta\\}, \\qquad \\mathrm{sat} = k^* / d.

``rule="textbook"`` is this definition. ``rule="delve"`` reproduces
``delve.metrics.compute_intrinsic_dimensionality`` of delve 0.1.50, which keeps the eigenvectors
whose cumulative share is *below* delta and returns their number, ``#{k : p_k < delta}``.
Because :math:`p_k` is non-decreasing this is :math:`k^* - 1`: one less than the textbook value,
and 0 when the first eigenvalue alone reaches delta. The code means to keep at least one
dimension, and to add one when ``delta - p_k > 0.02``, but both steps slice the already
truncated eigenvector matrix and so never change the count. A zero covariance gives NaN shares,
no share below delta, and hence 0.

The PCA projection of a layer onto its delta eigenspace [Richter et al. 2021, §4] replaces the
features ``x`` by :math:`\\mu + (x - \\mu) V_k V_k^T`, with ``V_k`` the leading ``k``
eigenvectors; ``delta >= 1`` keeps the layer unchanged. The ablation replaces ``V_k`` by a
random orthonormal basis of the same rank.

References:
    Richter, M. L., Shenk, J., Byttner, W., Arpteg, A., & Huss, M. (2021). Feature space
    saturation during training. BMVC 2021 (arXiv 2006.08679).
    Shenk, J., Richter, M. L., Arpteg, A., & Huss, M. (2019). Spectral analysis of latent
    representations (delve). arXiv 1907.08589.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError
from curvlake.pipelines.saturation.moments import CONV_METHODS, ConvMethod, Moments

#: how the intrinsic dimension is read off the cumulative explained variance.
Rule = Literal["textbook", "delve"]
RULES: tuple[str, ...] = ("textbook", "delve")


@dataclass(frozen=True)
class Spectrum:
    """Eigendecomposition of a covariance matrix.

    Attributes:
        eigenvalues: ``(d,)`` in descending order, negatives from rounding set to 0.
        eigenvectors: ``(d, d)``; column ``i`` belongs to ``eigenvalues[i]``.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray


@dataclass(frozen=True)
class SaturationStats:
    """Per-layer spectrum statistics, with the choices that produced them.

    Attributes:
        eigenvalues: ``(d,)`` descending, clipped at 0.
        intrinsic_dimension: ``k`` under ``rule``.
        saturation: ``k / d``.
        trace: trace of the covariance (total variance; delve's ``trc``).
        n_features: ``d``.
        n_samples: rows the covariance was computed from.
        delta: the explained-variance threshold.
        rule: ``"textbook"`` or ``"delve"``.
        ddof: the covariance divisor is ``n_samples - ddof``.
    """

    eigenvalues: np.ndarray
    intrinsic_dimension: int
    saturation: float
    trace: float
    n_features: int
    n_samples: int
    delta: float
    rule: str
    ddof: int


def _check_delta(delta: Any) -> float:
    if (
        not isinstance(delta, (int, float, np.floating, np.integer))
        or isinstance(delta, bool)
        or not np.isfinite(delta)
        or delta <= 0
    ):
        raise UserInputError(f"delta must be a finite number > 0, got {delta!r}")
    return float(delta)


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise UserInputError(f"rule={rule!r}; allowed: {', '.join(RULES)}")


def covariance_spectrum(cov: Any) -> Spectrum:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric ``(d, d)`` matrix.

    Computed in float64 with ``torch.linalg.eigh(UPLO="U")`` on the matrix's device (NumPy input
    on the CPU), as delve does, so that ``rule="delve"`` sees the eigenvalues delve would.

    Raises:
        UserInputError: ``cov`` is not a square matrix.
    """
    t = (
        cov.detach()
        if isinstance(cov, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(cov))
    )
    t = t.to(torch.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise UserInputError(f"covariance must be a non-empty square matrix, got {tuple(t.shape)}")
    values, vectors = torch.linalg.eigh(t, UPLO="U")
    values, order = values.sort(descending=True)
    vectors = vectors[:, order]
    values = torch.where(values < 0, torch.zeros_like(values), values)
    return Spectrum(values.cpu().numpy(), vectors.cpu().numpy())


def explained_variance_ratio(eigenvalues: Any) -> np.ndarray:
    """Per-component share of the variance, :math:`\\lambda_i / \\sum_j \\lambda_j`.

    All zeros when the total variance is zero.
    """
    values = np.asarray(eigenvalues, dtype=np.float64)
    total = values.sum()
    return values / total if total > 0 else np.zeros_like(values)


def cumulative_explained_variance(eigenvalues: Any) -> np.ndarray:
    """:math:`p_k = \\sum_{i \\le k} \\lambda_i / \\sum_i \\lambda_i` for descending eigenvalues.

    The last entry is exactly 1 (the cumulative sum's last term is the divisor). Zero total
    variance gives all ones: every eigenspace, the empty one included, explains all of it.
    """
    cumulative = np.cumsum(np.asarray(eigenvalues, dtype=np.float64))
    if cumulative.size == 0 or cumulative[-1] <= 0:
        return np.ones_like(cumulative)
    return cumulative / cumulative[-1]


def intrinsic_dimension(eigenvalues: Any, delta: float, rule: Rule = "textbook") -> int:
    """Size ``k`` of the delta eigenspace of a descending, non-negative spectrum.

    - ``"textbook"``: :math:`k^* = \\min\\{k : p_k \\ge \\delta\\}` for ``delta < 1``; ``d`` for
      ``delta >= 1`` (keep every dimension, as phd-lab's ``thresh=3.0``); ``0`` when the total
      variance is zero (constant features need no dimension).
    - ``"delve"``: delve 0.1.50's count :math:`\\#\\{k : p_k < \\delta\\} = k^* - 1` (no
      minimum: a spectrum whose first eigenvalue reaches delta, or a zero spectrum, gives 0),
      with :math:`p_k` computed in torch as delve does (``cumsum / sum``), so that given the same
      eigenvalues the result is delve's to the last bit.

    Args:
        eigenvalues: ``(d,)``, descending and non-negative (as :func:`covariance_spectrum`).
        delta: explained-variance threshold, > 0 (delve's ``sat_threshold``, default 0.99).
        rule: ``"textbook"`` or ``"delve"``.

    Raises:
        UserInputError: a bad delta or rule, or an empty spectrum.
    """
    delta = _check_delta(delta)
    _check_rule(rule)
    values = np.asarray(eigenvalues, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise UserInputError(f"eigenvalues must be a non-empty vector, got shape {values.shape}")
    if rule == "delve":
        t = torch.from_numpy(values)
        shares = t.cumsum(0) / t.sum()
        return int((shares < delta).sum())
    if delta >= 1:
        return int(values.size)
    cumulative = np.cumsum(values)
    if cumulative[-1] <= 0:
        return 0
    shares = cumulative / cumulative[-1]
    return int(np.argmax(shares >= delta)) + 1


def saturation_statistics(
    moments: Moments, *, delta: float, rule: Rule = "textbook", ddof: int
) -> SaturationStats:
    """Spectrum, intrinsic dimension, saturation ``k / d`` and trace of one layer's moments.

    ``ddof`` scales the eigenvalues and the trace only; ``k`` and the saturation do not depend
    on it. delve uses ``ddof=0``.

    Raises:
        UserInputError: a bad delta, rule or ddof, or too few rows for ``ddof``.
    """
    delta = _check_delta(delta)
    _check_rule(rule)
    cov = moments.covariance(ddof)
    spectrum = covariance_spectrum(cov)
    k = intrinsic_dimension(spectrum.eigenvalues, delta, rule)
    d = moments.n_features
    return SaturationStats(
        eigenvalues=spectrum.eigenvalues,
        intrinsic_dimension=k,
        saturation=k / d,
        trace=float(np.trace(cov)),
        n_features=d,
        n_samples=moments.count,
        delta=delta,
        rule=rule,
        ddof=int(ddof),
    )


def projection_matrix(eigenvectors: Any, k: int) -> np.ndarray:
    """Orthogonal projector :math:`P = V_k V_k^T` onto the span of the first ``k`` columns.

    ``k == d`` returns the identity exactly (so a full-rank projection is a no-op), ``k == 0``
    the zero matrix.

    Raises:
        UserInputError: ``eigenvectors`` is not ``(d, d)`` or ``k`` is not in ``[0, d]``.
    """
    vectors = np.asarray(eigenvectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != vectors.shape[1]:
        raise UserInputError(f"eigenvectors must be (d, d), got {vectors.shape}")
    d = vectors.shape[0]
    _check_rank(k, d)
    if k == d:
        return np.eye(d)
    basis = vectors[:, :k]
    return basis @ basis.T


def random_projection_matrix(n_features: int, k: int, seed: int | Sequence[int]) -> np.ndarray:
    """Projector onto a uniformly random ``k``-dimensional subspace (the PCA ablation).

    The basis is the Q factor of a ``(d, k)`` standard normal matrix drawn from
    ``numpy.random.default_rng(seed)`` (pass ``[seed, layer_index]`` for one stream per
    layer), with the signs fixed by ``diag(R) > 0`` so that it is Haar distributed and
    reproducible. ``k == d`` returns the identity exactly.

    Raises:
        UserInputError: ``k`` is not in ``[0, n_features]``.
    """
    if not isinstance(n_features, (int, np.integer)) or n_features < 1:
        raise UserInputError(f"n_features must be a positive int, got {n_features!r}")
    d = int(n_features)
    _check_rank(k, d)
    if k == d:
        return np.eye(d)
    gaussian = np.random.default_rng(seed).standard_normal((d, k))
    q, r = np.linalg.qr(gaussian)
    q = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)
    return q @ q.T


def delta_projection(
    spectrum: Spectrum, delta: float, rule: Rule = "textbook"
) -> tuple[np.ndarray, int]:
    """The PCA projector of a layer at threshold ``delta`` and its rank.

    ``delta >= 1`` gives the identity and ``d`` under either rule (the layer is unchanged).

    Returns:
        ``(P, k)`` with ``P`` the ``(d, d)`` projector.
    """
    delta = _check_delta(delta)
    d = spectrum.eigenvalues.size
    if delta >= 1:
        return np.eye(d), d
    k = intrinsic_dimension(spectrum.eigenvalues, delta, rule)
    return projection_matrix(spectrum.eigenvectors, k), k


def project_features(
    x: Any, mean: Any, projection: Any, conv_method: ConvMethod = "channelwise"
) -> Any:
    """Apply a layer's projection: :math:`x \\mapsto \\mu + (x - \\mu) P`.

    ``(N, d)`` outputs are projected row by row. Convolutional outputs ``(N, C, *spatial)`` are
    projected along the channel axis at every position for ``conv_method`` ``"channelwise"``,
    ``"mean"`` and ``"max"`` (``d = C``, a 1x1 convolution as phd-lab's ``Conv2DPCALayer``), and
    as flattened vectors for ``"flatten"`` (``d = C * prod(spatial)``). An exact identity ``P``
    returns ``x`` itself.

    Args:
        x: torch tensor (computed in its dtype on its device) or NumPy / CuPy array.
        mean: ``(d,)`` feature mean.
        projection: ``(d, d)`` symmetric projector.
        conv_method: as in :func:`curvlake.pipelines.saturation.moments.conv_features`.

    Raises:
        UserInputError: an unknown method or mismatched shapes.
    """
    if conv_method not in CONV_METHODS:
        raise UserInputError(f"conv_method={conv_method!r}; allowed: {', '.join(CONV_METHODS)}")
    p = np.asarray(to_numpy(projection), dtype=np.float64)
    d = p.shape[0] if p.ndim == 2 else -1
    if p.shape != (d, d):
        raise UserInputError(f"projection must be (d, d), got {p.shape}")
    if x.ndim < 2:
        raise UserInputError(f"features must be (N, d) or (N, C, ...), got {tuple(x.shape)}")
    flat = x.ndim == 2 or conv_method == "flatten"
    width = math.prod(x.shape[1:]) if flat else x.shape[1]
    if width != d:
        raise UserInputError(
            f"projection is {d} x {d} but the features have {width} dimensions "
            f"(shape {tuple(x.shape)}, conv_method={conv_method!r})"
        )
    if np.count_nonzero(p) == d and np.all(np.diagonal(p) == 1):  # the identity, exactly
        return x
    mu = np.asarray(to_numpy(mean), dtype=np.float64)
    if isinstance(x, torch.Tensor):
        p_x = torch.as_tensor(p, dtype=x.dtype, device=x.device)
        mu_x = torch.as_tensor(mu, dtype=x.dtype, device=x.device)
        if flat:
            return ((x.reshape(x.shape[0], -1) - mu_x) @ p_x + mu_x).reshape(x.shape)
        return ((x.movedim(1, -1) - mu_x) @ p_x + mu_x).movedim(-1, 1)
    xp = get_namespace(x)
    p_x = xp.asarray(p, dtype=x.dtype)
    mu_x = xp.asarray(mu, dtype=x.dtype)
    if flat:
        return ((x.reshape(x.shape[0], -1) - mu_x) @ p_x + mu_x).reshape(x.shape)
    return xp.moveaxis((xp.moveaxis(x, 1, -1) - mu_x) @ p_x + mu_x, -1, 1)


def _check_rank(k: Any, d: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= d:
        raise UserInputError(f"rank k must be an int in [0, {d}], got {k!r}")
