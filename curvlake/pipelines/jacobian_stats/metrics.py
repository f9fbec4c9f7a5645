"""Per-example statistics of a classifier: accuracy, loss, confidence, input-Jacobian norms.

Every function here is a pure torch kernel: it takes an eval-mode model and a batch ``x`` of
``n`` examples (with labels ``y``) and returns one value per example, in ``x``'s dtype and on
``x``'s device. The zarr lake, the Dask graph and the CLI are built on top of these.

Notation. ``f: R^D -> R^K`` is the model (logits), applied to one example; ``T`` an optional
input transform (for instance the dataset standardization); ``g`` the output normalization
(``NORMALIZATIONS``). The differentiated per-example map is::

    F(x) = g(f(T(x)))  in R^{K'}          (K' = K, or 1 for 'crossentropy' / target_only)
    J(x) = dF/dx       in R^{K' x D}      (the input Jacobian, D = number of input entries)

and the norms are ``||J||_F = sqrt(trace(J J^T))`` and ``||J||_2 = sigma_max(J) =
sqrt(lambda_max(J J^T))``.

Method. K' << D for classifiers, so the cheapest exact route is reverse mode: one forward pass
and one batched backward pass with the K' one-hot cotangents ``e_k`` (``torch.func.vjp`` under
``torch.func.vmap``) give all rows ``e_k^T J`` of every example's Jacobian; the K' x K' Gram
matrix ``J J^T`` is then formed and diagonalized in float64. For large K' the matrix-free
Lanczos iteration (``method='lanczos'``) needs only Jacobian-vector products.

Output maps. For 'softmax', 'logsoftmax' and 'crossentropy' autograd differentiates the logits
only, and ``J = A J_f`` with the output map's Jacobian ``A = dg/dz`` (K' x K) built per example
in float64 without cancellation (:func:`_output_jacobian`): the exact norms come from
``A (J_f J_f^T) A^T``, Lanczos applies ``A`` and ``A^T`` to its K'-vectors. Confident examples
(``1 - p_max`` far below float32's rounding of 1) thus get float32 norms as accurate as the
float32 logits allow (within 1e-6 of float64 at ``1 - p_max = 1e-6``, 1e-5 at 1e-30), at the
cost of ``'none'``.

Examples must be independent for the batched computation to give per-example Jacobians: the
model must be in eval mode (BatchNorm uses running statistics, dropout is off). Training mode is
rejected.

Reference: M. Gamba, H. Azizpour, M. Björkman, *On the Lipschitz Constant of Deep Networks and
Double Descent*, BMVC 2023 (arXiv:2301.12309). Unlike the authors' code this module computes the
operator norm exactly (their power iteration used an absolute tolerance and a wrong reshape, and
returned 0 for norms below 0.01).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as torch_f
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from curvlake.errors import UserInputError
from curvlake.pipelines.jacobian_stats._input_grad_conv import input_gradient_convolutions

__all__ = [
    "JACOBIAN_METRICS",
    "METHODS",
    "METRICS",
    "NORMALIZATIONS",
    "JacobianNorms",
    "LanczosResult",
    "compute_metric",
    "gram_norms",
    "input_jacobian",
    "jacobian_norms",
    "lanczos_operator_norm",
    "output_map",
    "start_vectors",
]

METRICS = ("accuracy", "cross_entropy", "confidence", "jacobian_frobenius", "jacobian_operator")
"""Per-example metrics accepted by :func:`compute_metric`."""

JACOBIAN_METRICS = ("jacobian_frobenius", "jacobian_operator")
"""The metrics that differentiate the model (the others need one forward pass)."""

NORMALIZATIONS = ("none", "softmax", "logsoftmax", "crossentropy")
"""Output maps ``g`` applied to the logits before taking the input Jacobian."""

METHODS = ("exact", "lanczos")
"""Ways to compute ``jacobian_operator``: Gram eigenvalue (exact) or matrix-free Lanczos."""

InputTransform = Callable[[Tensor], Tensor]
OutputMap = Callable[[Tensor, Tensor | None], Tensor]


class JacobianNorms(NamedTuple):
    """Both norms of each example's input Jacobian, in float64, shape ``(n,)`` each."""

    operator: Tensor
    frobenius: Tensor


class LanczosResult(NamedTuple):
    """Result of :func:`lanczos_operator_norm`, one entry per example.

    Attributes:
        sigma: Estimated ``||J||_2`` (float64). A lower bound up to rounding: it is the square
            root of the largest Ritz value of ``J J^T``.
        n_iter: Number of Lanczos steps (operator applications) taken.
        converged: Whether the stopping test was met (or the Krylov space reached dimension K',
            where the result is exact); False means ``max_iter`` ran out.
    """

    sigma: Tensor
    n_iter: Tensor
    converged: Tensor


# --------------------------------------------------------------------------------------------
# validation


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserInputError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise UserInputError(
            "model (modules "
            + ", ".join(training[:3])
            + (", ..." if len(training) > 3 else "")
            + ") is in training mode; call model.eval() first: per-example statistics need "
            "independent examples (BatchNorm running statistics, no dropout)"
        )


def _check_batch(x: Tensor, y: Tensor | None, needs_y: bool) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise UserInputError("x must be a floating-point tensor of shape (n, ...)")
    if y is None:
        if needs_y:
            raise UserInputError("y (integer labels of shape (n,)) is required for this metric")
        return
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or y.ndim != 1:
        raise UserInputError("y must be an integer tensor of shape (n,)")
    if y.shape[0] != x.shape[0]:
        raise UserInputError(f"y has {y.shape[0]} labels but x has {x.shape[0]} examples")


def _check_logits(z: Tensor, y: Tensor | None) -> None:
    if z.ndim != 2:
        raise UserInputError(f"the model must return logits of shape (n, K), got {tuple(z.shape)}")
    if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
        raise UserInputError(f"labels y must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}]")


def _check_output(out: Tensor) -> None:
    if out.ndim != 2:
        raise UserInputError(
            f"the model must return logits of shape (n, K), got {tuple(out.shape)}"
        )


def _needs_y(normalization: str, target_only: bool) -> bool:
    return target_only or normalization == "crossentropy"


def _check_jacobian_options(normalization: str, target_only: bool) -> None:
    _check_choice("normalization", normalization, NORMALIZATIONS)
    if target_only and normalization == "crossentropy":
        raise UserInputError(
            "target_only=True cannot be combined with normalization='crossentropy' (the loss is "
            "already a scalar per example)"
        )


# --------------------------------------------------------------------------------------------
# the differentiated map


def _auto_channels_last(x: Tensor, channels_last: bool | None) -> bool:
    if channels_last is None:
        # oneDNN / cuDNN convolutions (and their vmapped backward) are much faster on NHWC for
        # the low-precision dtypes; float64 takes a reference path where NHWC only adds copies.
        return x.ndim == 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return bool(channels_last) and x.ndim == 4


def _functional_model(model: nn.Module, channels_last: bool) -> Callable[[Tensor], Tensor]:
    # Detached parameters: the only primal is x, so no graph is recorded for the weights and no
    # weight gradient is ever computed (the seed accumulated them K times per batch).
    params = {}
    for name, p in model.named_parameters():
        p = p.detach()
        if channels_last and p.ndim == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params[name] = p

    def f(x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))

    return f


def _shift_to_max(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``d = z - z_m`` with ``d_m = 0`` (``m = argmax z``), ``exp(d)`` and ``s``; see below."""
    m = z.argmax(dim=-1, keepdim=True)
    is_max = torch.arange(z.shape[-1], device=z.device) == m
    # z_m is differentiated (d depends on z through differences only); d_m is the constant 0,
    # so the adjoint of the one entry that would carry 1 - p_m is dropped, not cancelled.
    d = (z - z.gather(-1, m)).masked_fill(is_max, 0.0)
    e = d.exp()
    s = e.masked_fill(is_max, 0.0).sum(dim=-1, keepdim=True)
    return d, e, s


def _stable_softmax(z: Tensor) -> Tensor:
    """``softmax(z)`` over the last axis, with a derivative free of ``1 - p_max`` cancellation.

    With ``m = argmax z``, ``d_c = z_c - z_m`` (``d_m = 0``) and ``s = sum_{c != m} exp(d_c)``::

        p = exp(d) / (1 + s),        1 - p_m = s / (1 + s).

    The values are accurate to relative rounding, and so is the derivative autograd takes of
    this expression (unlike ``torch.softmax``'s, see :func:`_output_jacobian`): with
    ``delta = dz``, forward mode computes::

        (dp)_i = p_i * sum_{c != i} p_c (delta_i - delta_c)
               = p_i * ((delta_i - delta_m) + sum_{c != m} p_c (delta_m - delta_c))

    in the second form, and reverse mode (cotangent ``v``) gives component ``c != m`` of
    ``(diag(p) - p p^T) v`` as ``p_c (v_c - p.v)`` and component ``m`` as minus the sum of the
    others (the map depends on ``z`` through differences only): every term carries a factor
    ``p_c``, ``c != m``, and no ``1 - p_m`` is formed from a rounded ``p_m``.
    """
    _, e, s = _shift_to_max(z)
    return e / (1.0 + s)


def _stable_log_softmax(z: Tensor) -> Tensor:
    """``log_softmax(z) = d - log1p(s)`` (notation of :func:`_stable_softmax`).

    The value ``-log p_m = log1p(s)`` is accurate to relative rounding (``logsumexp(z) - z_m``
    is not when ``1 - p_m`` is below the rounding of ``z_m``). Derivative ``I - 1 p^T``;
    forward mode, with ``delta = dz``::

        (d log p)_i = sum_{c != i} p_c (delta_i - delta_c)
                    = (delta_i - delta_m) + sum_{c != m} p_c (delta_m - delta_c),

    so row ``m``, of size ``O(1 - p_m)`` (the target row of a confidently correct example), is
    not the difference of ``delta_m`` and ``p.delta``; reverse mode gives component ``c != m``
    of ``(I - p 1^T) v`` as ``v_c - p_c sum(v)`` and component ``m`` as minus the sum of those,
    not as ``v_m - p_m sum(v)`` (for ``v = e_m``: ``1 - p_m`` from a rounded ``p_m``).
    """
    d, _, s = _shift_to_max(z)
    return d - torch.log1p(s)


def _normalize(z: Tensor, y: Tensor | None, normalization: str, target_only: bool) -> Tensor:
    if normalization == "crossentropy":
        return -_stable_log_softmax(z).gather(-1, y[:, None])
    if normalization == "softmax":
        z = _stable_softmax(z)
    elif normalization == "logsoftmax":
        z = _stable_log_softmax(z)
    if target_only:
        z = z.gather(-1, y[:, None])
    return z


def output_map(
    model: nn.Module,
    *,
    normalization: str = "none",
    target_only: bool = False,
    input_transform: InputTransform | None = None,
    channels_last: bool = False,
) -> OutputMap:
    """Build the batched map ``F(x, y) = g(f(T(x)))`` whose input Jacobian is measured.

    Args:
        model: Classifier ``f`` returning logits of shape ``(n, K)``, in eval mode.
        normalization: The output map ``g``:

            * ``'none'``: ``g(z) = z`` (logits);
            * ``'softmax'``: ``g(z) = softmax(z)``, Jacobian ``diag(p) - p p^T`` times ``J_f``;
            * ``'logsoftmax'``: ``g(z) = z - logsumexp(z)``, Jacobian ``I - 1 p^T`` times
              ``J_f``;
            * ``'crossentropy'``: ``g(z) = -log softmax(z)_y``, a scalar, so the Jacobian is the
              input gradient of the loss (one row, K' = 1).

            The three are evaluated relative to the largest logit so that their derivatives
            (reverse and forward mode) are free of the cancellation in ``1 - p_max``
            (:func:`_stable_softmax`, :func:`_stable_log_softmax`).
        target_only: Keep only the target row ``y`` of ``g`` (K' = 1).
        input_transform: ``T``, applied to ``x`` inside the differentiated function (see
            :func:`compute_metric`).
        channels_last: Run the model on NHWC-strided input and 4-D weights (same numbers,
            faster convolutions on CPU); only meaningful for 4-D inputs.

    Returns:
        ``F(x, y) -> (n, K')``. ``y`` may be None unless ``target_only`` or
        ``normalization='crossentropy'``.
    """
    _check_jacobian_options(normalization, target_only)
    f = _functional_model(model, channels_last)

    def fmap(x: Tensor, y: Tensor | None = None) -> Tensor:
        if input_transform is not None:
            x = input_transform(x)
        return _normalize(f(x), y, normalization, target_only)

    return fmap


def _prepare(x: Tensor, channels_last: bool) -> Tensor:
    x = x.detach()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _network_map(
    model: nn.Module,
    normalization: str,
    target_only: bool,
    input_transform: InputTransform | None,
    channels_last: bool,
) -> OutputMap:
    """The map pushed through autograd: ``F`` for ``'none'``, else the logits ``f(T(x))``.

    The other normalizations are applied afterwards, in float64, by :func:`_output_jacobian`.
    """
    if normalization == "none":
        return output_map(
            model,
            target_only=target_only,
            input_transform=input_transform,
            channels_last=channels_last,
        )
    return output_map(model, input_transform=input_transform, channels_last=channels_last)


def _output_jacobian(
    z: Tensor, y: Tensor | None, normalization: str, target_only: bool
) -> Tensor | None:
    """``A = dg/dz`` of every example, ``(n, K', K)`` in float64; None for ``'none'``.

    With ``p = softmax(z)`` and ``L = I - 1 p^T`` (the log-softmax Jacobian; entries
    ``L_ii = 1 - p_i``, ``L_ic = -p_c``)::

        'logsoftmax': A = L,    'softmax': A = diag(p) L = diag(p) - p p^T,
        'crossentropy': A = -L_y = (p - e_y)^T,    target_only: row y of A.

    Row i of ``L J_f`` is ``sum_{c != i} p_c (J_{f,i} - J_{f,c})``: these matrices are applied
    to the logit Jacobian ``J_f`` in float64 (``J = A J_f``). Every entry is a product of the
    ``p_c`` (computed relative to the largest logit, :func:`_stable_softmax`) and ``1 - p_i``.
    Only the largest ``p_m`` can be close to 1 (the others are <= 1/2, so ``1 - p_i`` is
    harmless), and ``1 - p_m`` is taken as ``sum_{c != m} p_c``, never formed as a difference
    of nearly equal numbers: each entry has relative accuracy ~1e-16 given ``z``, whatever
    ``1 - p_m`` is. ``torch.softmax``'s own backward instead forms ``p_m (1 - p_m)`` from a
    rounded ``p_m``: about one float32 ulp of 1 (6e-8) of absolute error, up to 6% of the value
    when ``1 - p_m = 1e-6``, and since every entry of ``diag(p) - p p^T`` is ``O(1 - p_m)``
    (its spectral norm is at most ``2 max_i p_i (1 - p_i)``), percent-level errors in the
    per-example norms.
    """
    if normalization == "none":
        return None
    z = z.detach().to(torch.float64)
    n, k = z.shape
    p = _stable_softmax(z)
    is_max = torch.arange(k, device=z.device) == z.argmax(dim=-1, keepdim=True)
    one_minus_p = torch.where(is_max, p.masked_fill(is_max, 0.0).sum(-1, keepdim=True), 1.0 - p)
    diagonal = torch.eye(k, dtype=torch.bool, device=z.device)
    a = torch.where(diagonal, torch.diag_embed(one_minus_p), -p[:, None, :])  # L
    if normalization == "softmax":
        a = p[:, :, None] * a
    elif normalization == "crossentropy":
        a = -a
    if target_only or normalization == "crossentropy":
        a = a[torch.arange(n, device=z.device), y][:, None, :]
    return a


def _unit(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(v_i / ||v_i||, ||v_i||)`` over the first axis: the norm in float64, 1 where v_i = 0.

    Network products are taken along unit vectors and rescaled in float64, so that a small
    factor (``p_y``, ``1 - p_max``, ``sigma^2`` in Lanczos) never makes float32 underflow or go
    subnormal, which also costs time: subnormal arithmetic is slow on CPUs.
    """
    size = torch.linalg.vector_norm(v.flatten(1), dim=-1, dtype=torch.float64)
    size = torch.where(size > 0, size, 1.0)
    return v / size.to(v.dtype).reshape(-1, *(1,) * (v.ndim - 1)), size


# --------------------------------------------------------------------------------------------
# exact: full per-example Jacobian + Gram matrix


def input_jacobian(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    normalization: str = "none",
    target_only: bool = False,
    input_transform: InputTransform | None = None,
    chunk_size: int | None = None,
    channels_last: bool | None = None,
) -> Tensor:
    """Per-example input Jacobians ``J_i = dF(x_i)/dx_i``, flattened to ``(n, K', D)``.

    Reverse mode, batched twice: one forward pass over the batch, then one backward pass per
    one-hot cotangent ``e_k`` (k < K'), all K' run together by ``torch.func.vmap`` over the
    ``vjp`` function. Because examples are independent (eval mode), the gradient of
    ``sum_i e_k^T F(x_i)`` with respect to ``x_i`` is exactly row k of ``J_i``: no sample mixing
    (the seed's ``--bigmem`` path mixed them). Cost: about one forward and K' input-only
    backward passes; memory about K' times the activations of the batch (limit it with
    ``chunk_size``).

    For ``'softmax'`` and ``'logsoftmax'`` the backward passes give the logit Jacobian ``J_f``
    and ``J = A J_f`` is formed in float64 (``A`` the output map's Jacobian,
    :func:`_output_jacobian`); a single row (``target_only``, ``'crossentropy'``) is one
    backward pass along ``a / ||a||`` for its row ``a^T`` of ``A``, scaled by ``||a||``.

    Args:
        model: Classifier in eval mode, parameters in ``x``'s dtype and device.
        x: Inputs ``(n, ...)``, in the space in which the Jacobian is taken.
        y: Integer labels ``(n,)``; needed for ``target_only`` and ``'crossentropy'``.
        normalization: One of ``NORMALIZATIONS`` (see :func:`output_map`).
        target_only: Only the row of the target class (K' = 1).
        input_transform: Callable ``T`` applied inside the differentiated function.
        chunk_size: Number of cotangents per vmapped backward pass (None: all K' at once).
        channels_last: NHWC striding for 4-D inputs; None picks it for float32/16 inputs.

    Returns:
        Tensor ``(n, K', D)`` in ``x``'s dtype, ``D = prod(x.shape[1:])``.
    """
    left, jac = _jacobian_factors(
        model, x, y, normalization, target_only, input_transform, chunk_size, channels_last
    )
    return jac if left is None else (left @ jac.to(torch.float64)).to(x.dtype)


def _jacobian_factors(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    normalization: str,
    target_only: bool,
    input_transform: InputTransform | None,
    chunk_size: int | None,
    channels_last: bool | None,
) -> tuple[Tensor | None, Tensor]:
    _check_model(model)
    _check_batch(x, y, _needs_y(normalization, target_only))
    cl = _auto_channels_last(x, channels_last)
    fmap = _network_map(model, normalization, target_only, input_transform, cl)
    return _jacobian(fmap, _prepare(x, cl), y, chunk_size, normalization, target_only)


def _jacobian(
    fmap: OutputMap,
    x: Tensor,
    y: Tensor | None,
    chunk_size: int | None,
    normalization: str = "none",
    target_only: bool = False,
) -> tuple[Tensor | None, Tensor]:
    """Per-example ``J = A R``: ``A`` float64 ``(n, K', r)`` (None: identity), ``R (n, r, D)``.

    ``R`` is the Jacobian of ``fmap`` (``r`` rows, in ``x``'s dtype) and ``A`` the output map's
    (:func:`_output_jacobian`); a single row ``a^T J_f`` is computed as one VJP along the unit
    vector ``a / ||a||``, with ``A = ||a||``.
    """
    n, d = x.shape[0], math.prod(x.shape[1:])
    with input_gradient_convolutions():  # a leaner vmapped conv backward (see its module)
        out, vjp_fn = vjp(lambda xx: fmap(xx, y), x)
    _check_output(out)
    left = _output_jacobian(out, y, normalization, target_only)
    if left is not None and left.shape[1] == 1:
        direction, size = _unit(left[:, 0])
        (g,) = vjp_fn(direction.to(out.dtype))
        return size[:, None, None], g.reshape(n, 1, d)
    k = out.shape[-1]
    if k == 1:
        (g,) = vjp_fn(torch.ones_like(out))
        return left, g.reshape(n, 1, d)
    eye = torch.eye(k, dtype=out.dtype, device=out.device)
    cotangents = eye[:, None, :].expand(k, n, k)  # (K', n, K'): e_k for every example
    (g,) = vmap(vjp_fn, chunk_size=chunk_size)(cotangents)  # (K', n, *x.shape[1:])
    return left, g.reshape(k, n, d).transpose(0, 1)


def gram_norms(jac: Tensor, left: Tensor | None = None) -> JacobianNorms:
    """Operator and Frobenius norms of a batch of matrices from their Gram matrices.

    For each ``J`` (K' x D) form ``G = J J^T`` (or ``J^T J`` when D < K') in float64 and return
    ``sigma_max(J) = sqrt(lambda_max(G))`` (symmetric eigensolver) and
    ``||J||_F = sqrt(trace(G))``. ``lambda_max(G) = ||G||_2``, so the backward-stable eigensolver
    gives it to relative accuracy ~1e-16 whatever its size: tiny norms are returned accurately,
    never as 0 unless ``J = 0``.

    With ``left`` (``A``, float64), the norms are those of ``J = A R`` (``R = jac``), from
    ``G = A (R R^T) A^T``: ``A``'s scale (e.g. a softmax Jacobian's 1e-30) never passes through
    ``jac``'s dtype.

    Args:
        jac: Tensor ``(n, K', D)``, or ``R (n, r, D)`` with ``left``.
        left: Optional float64 tensor ``(n, K', r)``.

    Returns:
        :class:`JacobianNorms` of float64 tensors ``(n,)``.
    """
    j64 = jac.to(torch.float64)
    if left is not None:
        gram = left @ (j64 @ j64.mT) @ left.mT
    elif j64.shape[-2] <= j64.shape[-1]:
        gram = j64 @ j64.mT
    else:
        gram = j64.mT @ j64
    frobenius = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()
    operator = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
    return JacobianNorms(operator=operator, frobenius=frobenius)


def jacobian_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    normalization: str = "none",
    target_only: bool = False,
    input_transform: InputTransform | None = None,
    chunk_size: int | None = None,
    channels_last: bool | None = None,
) -> JacobianNorms:
    """Exact ``||J_i||_2`` and ``||J_i||_F`` of every example from one Jacobian computation.

    :func:`input_jacobian` followed by :func:`gram_norms` (with the output map's Jacobian as
    ``left``, see :func:`_output_jacobian`); use it to get both norms for the price of one.
    Arguments as in :func:`input_jacobian`.

    Returns:
        :class:`JacobianNorms` of float64 tensors ``(n,)``.
    """
    left, jac = _jacobian_factors(
        model, x, y, normalization, target_only, input_transform, chunk_size, channels_last
    )
    return gram_norms(jac, left)


# --------------------------------------------------------------------------------------------
# matrix-free: Lanczos on J J^T


def start_vectors(seed: int, sample_ids: Tensor | Sequence[int], dim: int) -> np.ndarray:
    """Counter-based random unit start vectors, one per example.

    Row i is drawn from ``numpy.random.default_rng([seed, sample_ids[i]])``, so an example gets
    the same start vector whatever batch it is in, its position, or the worker.

    Args:
        seed: Non-negative integer seed.
        sample_ids: Non-negative integer id of each example (e.g. its index in the split).
        dim: Vector length.

    Returns:
        float64 array ``(n, dim)`` with unit rows.
    """
    ids = np.asarray(
        sample_ids.cpu().numpy() if isinstance(sample_ids, Tensor) else sample_ids, dtype=np.int64
    )
    out = np.empty((ids.shape[0], dim))
    for row, sid in enumerate(ids.tolist()):
        out[row] = np.random.default_rng([seed, sid]).standard_normal(dim)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def lanczos_operator_norm(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    normalization: str = "none",
    target_only: bool = False,
    input_transform: InputTransform | None = None,
    rtol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    sample_ids: Tensor | Sequence[int] | None = None,
    channels_last: bool | None = None,
) -> LanczosResult:
    """Matrix-free ``||J_i||_2`` by Lanczos on ``A_i = J_i J_i^T`` (K' x K'), batched.

    Each step applies ``A u = J (J^T u)``: one reverse-mode product ``J^T u`` (``torch.func.vjp``
    on the batch, reusing one forward pass) and one forward-mode product ``J w``
    (``torch.func.jvp``), for all still-active examples at once. With Lanczos vectors
    ``u_1..u_j`` (fully re-orthogonalized in float64; they live in R^K', so this is cheap) and
    tridiagonal ``T_j = tridiag(beta, alpha, beta)``, the largest Ritz value ``theta`` of ``T_j``
    estimates ``lambda_max(A)``, and the residual of its Ritz pair is ``beta_j |s_j|`` (``s`` the
    eigenvector of ``T_j``, ``s_j`` its last entry). An example stops when

        beta_j |s_j| <= rtol * theta,

    which puts an eigenvalue of A within ``rtol * theta`` of theta (relative error of sigma about
    ``rtol / 2``), or when the Krylov space reaches dimension K' (then theta is exact), or after
    ``max_iter`` steps (a warning is emitted). The Ritz value never exceeds ``lambda_max``, so
    ``sigma = sqrt(theta)`` is a lower bound up to rounding. Examples stop independently; the
    shared forward pass is recomputed for the active ones when fewer than half remain.

    Reference: C. Lanczos (1950); convergence of the extreme Ritz values: Kaniel-Paige-Saad
    bounds, Y. Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., ch. 6.

    Args:
        model: Classifier in eval mode.
        x: Inputs ``(n, ...)``.
        y: Integer labels, needed for ``target_only`` / ``'crossentropy'``.
        normalization: One of ``NORMALIZATIONS``.
        target_only: Only the target row (K' = 1: the norm is then computed exactly from one
            reverse-mode product, as for ``'crossentropy'``).
        input_transform: Callable ``T`` applied inside the differentiated function.
        rtol: Relative tolerance of the stopping test (>= 0). The products run in ``x``'s dtype,
            so an rtol below its precision (about 1e-7 for float32) may only be met when the
            Krylov space is complete.
        max_iter: Maximum number of Lanczos steps (>= 1); at most K' are ever needed.
        seed: Seed of the start vectors (see :func:`start_vectors`).
        sample_ids: Id of each example for the start vectors; default ``0..n-1``. Pass the
            dataset indices to make results independent of batching.
        channels_last: NHWC striding for 4-D inputs; None picks it for float32/16 inputs.

    Returns:
        :class:`LanczosResult` with float64 ``sigma``.
    """
    _check_model(model)
    _check_jacobian_options(normalization, target_only)
    _check_batch(x, y, _needs_y(normalization, target_only))
    if not rtol >= 0:
        raise UserInputError(f"rtol={rtol!r} must be a non-negative number")
    if int(max_iter) < 1:
        raise UserInputError(f"max_iter={max_iter!r} must be a positive integer")
    if int(seed) < 0:
        raise UserInputError(f"seed={seed!r} must be a non-negative integer")
    n = x.shape[0]
    if sample_ids is None:
        sample_ids = torch.arange(n)
    sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64).cpu()
    if sample_ids.shape != (n,) or (n and int(sample_ids.min()) < 0):
        raise UserInputError(f"sample_ids must be {n} non-negative integers, one per example")

    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=x.device)
        return LanczosResult(empty, empty.long(), empty.bool())
    cl = _auto_channels_last(x, channels_last)
    fmap = _network_map(model, normalization, target_only, input_transform, cl)
    x = _prepare(x, cl)
    return _lanczos(
        fmap,
        x,
        y,
        rtol=float(rtol),
        max_iter=int(max_iter),
        seed=int(seed),
        ids=sample_ids,
        normalization=normalization,
        target_only=target_only,
    )


def _subset(y: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if y is None else y[idx]


def _lanczos(
    fmap: OutputMap,
    x: Tensor,
    y: Tensor | None,
    *,
    rtol: float,
    max_iter: int,
    seed: int,
    ids: Tensor,
    normalization: str = "none",
    target_only: bool = False,
) -> LanczosResult:
    n, dev, f64 = x.shape[0], x.device, torch.float64
    members = torch.arange(n, device=dev)  # examples covered by the current vjp function
    out, vjp_fn = vjp(lambda xx: fmap(xx, y), x)
    _check_output(out)
    # J = A J_f with the output map's A in float64 (None: fmap is F itself)
    left = _output_jacobian(out, y, normalization, target_only)
    k = out.shape[-1] if left is None else left.shape[1]
    if k == 1:  # a single row: ||J||_2 = ||J^T e_1||, exact from one product
        if left is None:
            (g,) = vjp_fn(torch.ones_like(out))
            size = torch.ones(n, dtype=f64, device=dev)
        else:
            direction, size = _unit(left[:, 0])
            (g,) = vjp_fn(direction.to(out.dtype))
        sigma = size * torch.linalg.vector_norm(g.reshape(n, -1), dim=-1, dtype=f64)
        one = torch.ones(n, dtype=torch.int64, device=dev)
        return LanczosResult(sigma, one, torch.ones(n, dtype=torch.bool, device=dev))

    steps = min(max_iter, k)
    basis = torch.zeros(n, steps, k, dtype=f64, device=dev)
    alpha = torch.zeros(n, steps, dtype=f64, device=dev)
    beta = torch.zeros(n, steps, dtype=f64, device=dev)
    basis[:, 0] = torch.as_tensor(start_vectors(seed, ids, k), dtype=f64, device=dev)
    theta = torch.zeros(n, dtype=f64, device=dev)
    n_iter = torch.zeros(n, dtype=torch.int64, device=dev)
    converged = torch.zeros(n, dtype=torch.bool, device=dev)
    active = torch.arange(n, device=dev)

    for j in range(steps):
        if 2 * active.numel() <= members.numel():
            x_sub, y_sub = x[active], _subset(y, active)
            _, vjp_fn = vjp(lambda xx, y_sub=y_sub: fmap(xx, y_sub), x_sub)
            members = active
        pos = torch.searchsorted(members, active)
        u = basis[active, j]
        # A u = A J_f J_f^T A^T u with both network products along unit vectors, their lengths
        # kept in float64: J J^T u is O(sigma^2), below float32's range for sigma < 1e-19
        if left is None:
            direction, size = u, torch.ones(active.numel(), dtype=f64, device=dev)
        else:
            direction, size = _unit((left[active].mT @ u[..., None]).squeeze(-1))
        cot = torch.zeros(members.numel(), out.shape[-1], dtype=x.dtype, device=dev)
        cot[pos] = direction.to(x.dtype)
        (jt_u,) = vjp_fn(cot)  # rows of inactive members are J^T 0 = 0, unused
        y_act = _subset(y, active)
        tangent, tangent_size = _unit(jt_u[pos])
        _, j_t = jvp(lambda xx, y_act=y_act: fmap(xx, y_act), (x[active],), (tangent,))
        w = j_t.to(f64) * (size * tangent_size)[:, None]
        if left is not None:
            w = (left[active] @ w[..., None]).squeeze(-1)

        if j > 0:
            w = w - beta[active, j - 1, None] * basis[active, j - 1]
        a = (u * w).sum(-1)
        alpha[active, j] = a
        w = w - a[:, None] * u
        prev = basis[active, : j + 1]  # (m, j+1, K')
        for _ in range(2):  # full re-orthogonalization, twice is enough (Kahan-Parlett)
            w = w - (prev.mT @ (prev @ w[..., None])).squeeze(-1)
        b = torch.linalg.vector_norm(w, dim=-1)
        beta[active, j] = b

        tri = torch.diag_embed(alpha[active, : j + 1])
        if j > 0:
            off = beta[active, :j]
            tri = tri + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
        evals, evecs = torch.linalg.eigh(tri)
        top = evals[:, -1].clamp_min(0)
        residual = b * evecs[:, -1, -1].abs()
        theta[active] = top
        n_iter[active] = j + 1

        done = (residual <= rtol * top) | (b == 0)
        if j + 1 == k:
            done = torch.ones_like(done)  # Krylov space is all of R^K': T_j is similar to A
        converged[active[done]] = True
        keep = ~done
        if j + 1 < steps:
            basis[active[keep], j + 1] = w[keep] / b[keep, None]
        active = active[keep]
        if active.numel() == 0:
            break

    if not bool(converged.all()):
        warnings.warn(
            f"Lanczos did not reach rtol={rtol:g} within max_iter={max_iter} for "
            f"{int((~converged).sum())} of {n} examples; their operator norms are lower bounds",
            RuntimeWarning,
            stacklevel=3,
        )
    return LanczosResult(theta.sqrt(), n_iter, converged)


# --------------------------------------------------------------------------------------------
# the public entry point


def compute_metric(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    metric: str,
    normalization: str = "none",
    target_only: bool = False,
    method: str = "exact",
    rtol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    sample_ids: Tensor | Sequence[int] | None = None,
    input_transform: InputTransform | None = None,
    chunk_size: int | None = None,
    channels_last: bool | None = None,
) -> Tensor:
    """One statistic per example of a batch.

    With logits ``z = f(T(x))`` (K classes), ``p = softmax(z)`` and label ``y``:

    * ``'accuracy'``: ``1[argmax_k z_k = y]`` (0.0 or 1.0; ties go to the first index);
    * ``'cross_entropy'``: ``-log p_y = logsumexp(z) - z_y``;
    * ``'confidence'``: ``||p - onehot(y)||_2`` (0 for a confident correct prediction, up to
      sqrt(2));
    * ``'jacobian_frobenius'``: ``||J(x)||_F`` with ``J = d g(f(T(x))) / dx`` (K' x D);
    * ``'jacobian_operator'``: ``||J(x)||_2 = sigma_max(J(x))``, the local Lipschitz constant of
      ``x -> g(f(T(x)))`` in the Euclidean norms; exact from the K' x K' Gram matrix
      (``method='exact'``) or by Lanczos (``method='lanczos'``, see
      :func:`lanczos_operator_norm`).

    Cross-entropy, confidence and the softmax / log-softmax / cross-entropy Jacobians never form
    ``1 - p_y`` as a difference (:func:`_stable_softmax`, :func:`_output_jacobian`), so they keep
    relative accuracy ~ the dtype's rounding on confident examples (with ``1 - p_max = 1e-6``,
    float32 is within 1e-6 of float64 per example; ``torch.softmax``'s derivative was off by
    up to 7%).

    ``normalization`` picks ``g`` (see :func:`output_map`; 'crossentropy' makes ``J`` the input
    gradient of the loss) and ``target_only`` keeps row ``y`` of ``J``. They apply to the
    Jacobian metrics only. Bounds useful as sanity checks: ``||J||_2 <= ||J||_F <=
    sqrt(K') ||J||_2``; the softmax Jacobian ``diag(p) - p p^T`` has spectral norm <= 1/2, so the
    softmax-normalized norm is at most half the logit norm.

    Input space. The Jacobian is taken with respect to ``x`` exactly as passed. The caller
    chooses the space: pass standardized inputs and ``input_transform=None`` for
    ``J_std = d g(f(x_std))/dx_std`` (what the seed measured), or raw pixels with
    ``input_transform = standardize`` (``x -> (x - mean) / std`` per channel) applied inside the
    differentiated function, which gives, by the chain rule, ``J_raw = J_std diag(1/std)``.
    Non-Jacobian metrics also see ``T(x)``.

    Args:
        model: Classifier returning logits ``(n, K)``, in eval mode, with parameters in ``x``'s
            dtype and on its device. It is not modified.
        x: Inputs ``(n, ...)``; the computation runs in ``x.dtype`` (float64 in tests).
        y: Integer labels ``(n,)``; needed by accuracy, cross_entropy, confidence and by the
            Jacobian metrics with ``target_only`` or ``normalization='crossentropy'``.
        metric: One of ``METRICS``.
        normalization: One of ``NORMALIZATIONS``; must be ``'none'`` for non-Jacobian metrics.
        target_only: Only the target-class row of the Jacobian (K' = 1); not with
            ``'crossentropy'``.
        method: ``'exact'`` or ``'lanczos'`` (``jacobian_operator`` only).
        rtol: Lanczos relative tolerance.
        max_iter: Lanczos step limit.
        seed: Lanczos start-vector seed.
        sample_ids: Dataset ids of the examples for the Lanczos start vectors (default
            ``0..n-1``); with them results do not depend on batching.
        input_transform: Callable ``T`` mapping ``x`` to the model's input, applied inside the
            differentiated function.
        chunk_size: Cotangents per vmapped backward pass for the exact Jacobian (memory cap).
        channels_last: NHWC striding for 4-D inputs (same values); None: on for float32/16.

    Returns:
        Tensor ``(n,)`` in ``x``'s dtype on ``x``'s device.

    Raises:
        UserInputError: Unknown metric / normalization / method, incompatible options, a model
            in training mode, or badly shaped inputs or labels.
    """
    _check_choice("metric", metric, METRICS)
    _check_choice("method", method, METHODS)
    _check_model(model)
    if metric not in JACOBIAN_METRICS:
        if normalization != "none" or target_only:
            raise UserInputError(
                f"normalization={normalization!r} / target_only={target_only!r} apply to the "
                f"Jacobian metrics only, not to metric={metric!r}"
            )
        if method != "exact":
            raise UserInputError(f"method={method!r} applies to 'jacobian_operator' only")
        _check_batch(x, y, needs_y=True)
        with torch.no_grad():
            xin = x if input_transform is None else input_transform(x)
            z = model(xin)
        _check_logits(z, y)
        if metric == "accuracy":
            return (z.argmax(dim=-1) == y).to(x.dtype)
        if metric == "cross_entropy":
            return -_stable_log_softmax(z).gather(-1, y[:, None]).squeeze(-1).to(x.dtype)
        p = _stable_softmax(z)
        is_y = torch_f.one_hot(y, z.shape[-1]).bool()
        # p_y - 1 = -sum_{c != y} p_c: no cancellation when p_y is close to 1
        residual = torch.where(is_y, -p.masked_fill(is_y, 0.0).sum(-1, keepdim=True), p)
        # squares in float64: (1 - p_y)^2 underflows float32 below 1 - p_y ~ 1e-19
        return torch.linalg.vector_norm(residual, dim=-1, dtype=torch.float64).to(x.dtype)

    _check_jacobian_options(normalization, target_only)
    if method == "lanczos" and metric != "jacobian_operator":
        raise UserInputError(f"method='lanczos' applies to 'jacobian_operator', not {metric!r}")
    needs_y = _needs_y(normalization, target_only)
    _check_batch(x, y, needs_y)
    if x.shape[0] == 0:
        return x.new_zeros(0)
    if y is not None:
        with torch.no_grad():
            xin = x[:1] if input_transform is None else input_transform(x[:1])
            _check_logits(model(xin), y)
    if method == "lanczos":
        res = lanczos_operator_norm(
            model,
            x,
            y if needs_y else None,
            normalization=normalization,
            target_only=target_only,
            input_transform=input_transform,
            rtol=rtol,
            max_iter=max_iter,
            seed=seed,
            sample_ids=sample_ids,
            channels_last=channels_last,
        )
        return res.sigma.to(x.dtype)
    norms = jacobian_norms(
        model,
        x,
        y if needs_y else None,
        normalization=normalization,
        target_only=target_only,
        input_transform=input_transform,
        chunk_size=chunk_size,
        channels_last=channels_last,
    )
    value = norms.operator if metric == "jacobian_operator" else norms.frobenius
    return value.to(x.dtype)
