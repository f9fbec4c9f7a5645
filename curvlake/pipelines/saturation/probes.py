"""Linear probes fitted out of core: L2 logistic regression with the loss summed over blocks.

A probe [Alain & Bengio 2016; Richter et al. 2021] is a logistic regression from a layer's
(standardized) features to the labels. phd-lab fits scikit-learn's ``LogisticRegression`` on all
latents held in memory; here the objective and its gradient are sums over example blocks, so a
solver iteration is one pass (e.g. a Dask reduction) over blocks that never need to fit in one
worker's memory together.

The objective is scikit-learn's (1.9, ``solver="lbfgs"``, L2 penalty, ``fit_intercept=True``),
written as it is minimized there, i.e. divided by ``n``:

.. math::

    f(W, b) = \\frac{1}{n} \\sum_{i=1}^{n} \\ell(W z_i + b, y_i)
              + \\frac{1}{2 C n} \\lVert W \\rVert_F^2,
    \\qquad z_i = (x_i - \\mu) / \\sigma,

which has the minimizer of :math:`C \\sum_i \\ell_i + \\tfrac12 \\lVert W \\rVert^2`; the
intercept ``b`` is not penalized, ``C = inf`` removes the penalty. For ``K >= 3`` classes
:math:`\\ell` is the multinomial cross-entropy with ``W`` of shape ``(K, d)``; for ``K = 2`` it is
the binomial log-loss with one row ``W`` ``(1, d)`` for class 1, as scikit-learn does for binary
targets (a two-row multinomial would be penalized differently). Both are minimized from zero by
``scipy.optimize.minimize(method="L-BFGS-B")`` with scikit-learn's options (``gtol=tol``,
``ftol=64 eps``, ``maxls=50``), so on data that fits in memory the probe matches
``LogisticRegression(C=C, tol=tol, max_iter=max_iter)`` fitted on the same standardized features.
The multinomial intercept is unique only up to a constant; from the zero start every gradient
sums to zero over the classes, so both solvers keep :math:`\\sum_k b_k = 0`.

Standardization uses streamed moments (:class:`~curvlake.pipelines.saturation.moments.Moments`)
with scikit-learn's ``StandardScaler`` conventions (``ddof=0``, unit scale for constant features)
and is applied to each block on the fly.

References:
    Alain, G., & Bengio, Y. (2016). Understanding intermediate layers using linear classifier
    probes. arXiv 1610.01644.
    Richter, M. L., Shenk, J., Byttner, W., Arpteg, A., & Huss, M. (2021). Feature space
    saturation during training. BMVC 2021 (arXiv 2006.08679).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import expit, log_expit, logsumexp, softmax

from curvlake.errors import UserInputError
from curvlake.pipelines.saturation.moments import Moments


@dataclass(frozen=True)
class LossGrad:
    """Summed cross-entropy and its gradient over a set of examples; blocks add up with ``+``.

    Attributes:
        loss: :math:`\\sum_i \\ell_i` (no penalty, not averaged).
        grad_coef: gradient of ``loss`` w.r.t. the coefficients, shape of ``coef``.
        grad_intercept: gradient w.r.t. the intercept, shape of ``intercept``.
        count: number of examples summed.
    """

    loss: float
    grad_coef: np.ndarray
    grad_intercept: np.ndarray
    count: int

    def __add__(self, other: LossGrad) -> LossGrad:
        return LossGrad(
            self.loss + other.loss,
            self.grad_coef + other.grad_coef,
            self.grad_intercept + other.grad_intercept,
            self.count + other.count,
        )


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe, in scikit-learn's layout.

    Attributes:
        coef: ``(K, d)`` for ``K >= 3`` classes, ``(1, d)`` for two (``coef_``).
        intercept: ``(K,)`` or ``(1,)`` (``intercept_``).
        n_iter: L-BFGS iterations (``n_iter_``); one data pass each, plus line-search passes.
        converged: whether L-BFGS-B stopped on its tolerance rather than ``max_iter`` or a
            line-search failure.
        objective: final value of ``f`` (the averaged, penalized loss above).
        n_evaluations: data passes made (loss / gradient evaluations).
        message: scipy's stopping message.
    """

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    converged: bool
    objective: float
    n_evaluations: int
    message: str


def standardization(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, scale)`` as ``StandardScaler`` would fit them: ``ddof=0``, scale 1 if constant.

    A feature counts as constant when its variance is below the rounding level of its mean
    (scikit-learn's test), so a constant offset does not turn rounding noise into a feature.
    """
    mean = moments.mean.copy()
    var = np.maximum(moments.variance(ddof=0), 0.0)
    eps = np.finfo(np.float64).eps
    bound = moments.count * eps * var + (moments.count * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[var <= bound] = 1.0
    return mean, scale


def _standardize(x: Any, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float64) - mean) / std


def probe_logits(
    coef: np.ndarray, intercept: np.ndarray, x: Any, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """Raw scores ``z W^T + b`` of a block, ``z = (x - mean) / std``: ``(n, K)`` or ``(n, 1)``."""
    return _standardize(x, mean, std) @ np.asarray(coef).T + np.asarray(intercept)


def block_loss_grad(
    coef: np.ndarray,
    intercept: np.ndarray,
    x_block: Any,
    y_block: Any,
    mean: np.ndarray,
    std: np.ndarray,
) -> LossGrad:
    """Summed cross-entropy of one block and its gradient, standardizing the block on the fly.

    With :math:`G` the residuals (softmax probabilities minus one-hot labels, or
    :math:`\\sigma(s) - y` for two classes) and :math:`Z` the standardized block:
    :math:`\\nabla_W = G^T Z`, :math:`\\nabla_b = G^T 1`.

    Args:
        coef: ``(K, d)`` (``K >= 3``) or ``(1, d)`` (two classes).
        intercept: ``(K,)`` or ``(1,)``.
        x_block: ``(n, d)`` features of the block (any float dtype; used in float64).
        y_block: ``(n,)`` integer labels in ``[0, K)`` (``{0, 1}`` for two classes).
        mean: ``(d,)`` feature mean, from the streamed moments.
        std: ``(d,)`` feature scale (see :func:`standardization`).
    """
    z = _standardize(x_block, mean, std)
    y = np.asarray(y_block).astype(np.int64, copy=False)
    scores = z @ coef.T + intercept
    if coef.shape[0] == 1:
        s = scores[:, 0]
        # log(1 + e^s) - y s, written stably
        loss = float(np.sum(-log_expit(s) + (1 - y) * s))
        residual = (expit(s) - y)[:, None]
    else:
        loss = float(np.sum(logsumexp(scores, axis=1) - scores[np.arange(y.size), y]))
        residual = softmax(scores, axis=1)
        residual[np.arange(y.size), y] -= 1.0
    return LossGrad(loss, residual.T @ z, residual.sum(axis=0), int(y.size))


def fit_probe(
    loss_grad: Callable[[np.ndarray, np.ndarray], LossGrad],
    n_features: int,
    n_classes: int,
    C: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 100,
) -> ProbeFit:
    """Minimize scikit-learn's L2 logistic objective by L-BFGS-B over a summed loss.

    Args:
        loss_grad: ``loss_grad(coef, intercept) -> LossGrad`` summed over *all* training
            examples, e.g. a Dask reduction of :func:`block_loss_grad` over lake blocks (the
            ``count`` it returns normalizes the objective).
        n_features: ``d``.
        n_classes: ``K >= 2``; two classes give a binomial probe with one coefficient row.
        C: inverse regularization strength, > 0 (``inf``: no penalty), as scikit-learn's.
        tol: L-BFGS-B ``gtol`` on the projected gradient of ``f``, as scikit-learn's ``tol``.
        max_iter: L-BFGS iterations, as scikit-learn's ``max_iter``.

    Raises:
        UserInputError: a bad size, ``C``, ``tol`` or ``max_iter``.
    """
    for name, value, low in (("n_features", n_features, 1), ("n_classes", n_classes, 2)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise UserInputError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(C, (int, float, np.floating)) or isinstance(C, bool) or not C > 0:
        raise UserInputError(f"C must be a number > 0 (inf for no penalty), got {C!r}")
    if not isinstance(tol, (int, float, np.floating)) or isinstance(tol, bool) or not tol > 0:
        raise UserInputError(f"tol must be a number > 0, got {tol!r}")
    if not isinstance(max_iter, (int, np.integer)) or isinstance(max_iter, bool) or max_iter < 1:
        raise UserInputError(f"max_iter must be an int >= 1, got {max_iter!r}")
    rows = 1 if n_classes == 2 else int(n_classes)
    d = int(n_features)
    evaluations = 0

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evaluations
        evaluations += 1
        coef = theta[: rows * d].reshape(rows, d)
        intercept = theta[rows * d :]
        total = loss_grad(coef, intercept)
        if total.count < 1:
            raise UserInputError("the probe's loss was summed over no examples")
        n = total.count
        strength = 0.0 if np.isinf(C) else 1.0 / (C * n)
        value = total.loss / n + 0.5 * strength * float(np.sum(coef * coef))
        grad_coef = np.asarray(total.grad_coef) / n + strength * coef
        grad = np.concatenate([grad_coef.ravel(), np.asarray(total.grad_intercept) / n])
        return value, grad

    result = optimize.minimize(
        objective,
        np.zeros(rows * d + rows),
        method="L-BFGS-B",
        jac=True,
        options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
    )
    theta = result.x
    return ProbeFit(
        coef=theta[: rows * d].reshape(rows, d).copy(),
        intercept=theta[rows * d :].copy(),
        n_iter=int(result.nit),
        converged=result.status == 0,
        objective=float(result.fun),
        n_evaluations=evaluations,
        message=str(result.message),
    )


def predict(
    coef: np.ndarray, intercept: np.ndarray, x: Any, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """Predicted class indices of a block (``(n,)`` int64)."""
    scores = probe_logits(coef, intercept, x, mean, std)
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return scores.argmax(axis=1).astype(np.int64)


def block_correct(
    coef: np.ndarray,
    intercept: np.ndarray,
    x_block: Any,
    y_block: Any,
    mean: np.ndarray,
    std: np.ndarray,
) -> tuple[int, int]:
    """``(correct, count)`` on one block: sum these over blocks for the accuracy."""
    y = np.asarray(y_block)
    return int(np.sum(predict(coef, intercept, x_block, mean, std) == y)), int(y.size)


def accuracy(
    coef: np.ndarray, intercept: np.ndarray, x: Any, y: Any, mean: np.ndarray, std: np.ndarray
) -> float:
    """Fraction of examples whose predicted class equals the label."""
    correct, count = block_correct(coef, intercept, x, y, mean, std)
    if count == 0:
        raise UserInputError("accuracy of an empty set of examples")
    return correct / count
