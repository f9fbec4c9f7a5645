"""Hessian- and GGN-vector products of the mean loss over a fixed data subset.

For a model ``z = f(x; θ) ∈ R^C``, a fixed data subset ``{(x_i, y_i)}_{i=1..n}`` and a
per-example loss ``ℓ`` (softmax cross-entropy; see :mod:`curvlake.autodiff._losses`), the
objective is the mean loss

    L(θ) = (1/n) Σ_i ℓ(f(x_i; θ), y_i),

and :class:`CurvatureOperator` multiplies a block of vectors ``V ∈ R^{P×k}`` by

* the Hessian ``H = ∇²_θ L`` (``kind="hessian"``), by forward-over-reverse differentiation:
  ``H v = ∂/∂ε ∇_θ L(θ + ε v)|_{ε=0}``, ``torch.func.jvp`` of ``torch.func.grad``
  (Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994);
* the generalised Gauss-Newton ``G = (1/n) Σ_i J_iᵀ H_ℓ(z_i) J_i`` (``kind="ggn"``, Schraudolph,
  "Fast curvature matrix-vector products for second-order gradient descent", Neural
  Computation 2002), with ``J_i = ∂f(x_i; θ)/∂θ`` and ``H_ℓ = ∂²ℓ/∂z²`` the Hessian of the loss
  at the output (``diag(p) − p pᵀ`` for cross-entropy): ``J v`` by ``jvp``, ``H_ℓ`` in closed
  form, ``Jᵀ u`` by ``vjp`` (one linearisation per batch shared by all ``k`` vectors).

Both are symmetric ``P × P`` matrices; ``G`` is positive semi-definite, and for cross-entropy
it equals the Fisher (the expectation of the per-example Fishers of
:mod:`curvlake.pipelines.npeff.pefs`).

The ``k`` vectors of a block are ``vmap``-ped, so one pass over the data computes ``H V`` for
all of them. The data are visited in fixed batches of ``batch_size`` examples in index order,
every batch's contribution is added in the compute dtype in that order: identical inputs give
bitwise identical results (on CPU; on CUDA up to non-deterministic kernels, unless
``torch.use_deterministic_algorithms(True)``), and changing ``batch_size`` (or the number of
vectors per block) changes only the rounding. The model is evaluated in eval mode (dropout off,
BatchNorm on its running statistics) on copies of its tensors taken at construction; the model
is never modified and its train/eval flags are restored after every product.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from curvlake.autodiff._losses import get_loss
from curvlake.autodiff._model import (
    MAX_DEFAULT_BATCH,
    FunctionalModel,
    as_input,
    batches,
    cast_input,
    check_batch_size,
    check_dtype_device,
    check_logits,
    eval_mode,
)
from curvlake.errors import UserInputError
from curvlake.nn.params import flat_tensor

__all__ = ["CurvatureKind", "CurvatureOperator"]

CurvatureKind = Literal["hessian", "ggn"]
_KINDS = ("hessian", "ggn")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

Matrix = TypeVar("Matrix", np.ndarray, torch.Tensor)


class CurvatureOperator:
    """The Hessian or GGN of the mean loss over ``(x, y)`` at the model's current θ.

    Args:
        model: Module mapping a batch ``(n, ...)`` to outputs ``(n, C)``.
        x: Inputs ``(n, ...)`` (floating inputs are cast to ``dtype``, integer ones kept).
        y: Targets; for cross-entropy ``(n,)`` integer classes in ``[0, C)``.
        kind: ``"hessian"`` or ``"ggn"``.
        loss: ``"cross_entropy"`` (mean over the ``n`` examples).
        dtype: Compute dtype (parameters, inputs, vectors and accumulation).
        device: Compute device (default: the model's).
        batch_size: Examples per data batch (default: ``min(n, 256)``); memory grows like
            ``batch_size · k`` activations for a block of ``k`` vectors.

    Attributes:
        kind: The curvature matrix.
        n_params: ``P``, the length of θ (:mod:`curvlake.nn.params`).
        n_examples: ``n``.
        n_products: Vectors multiplied so far (``k`` per :meth:`matmat` of ``k`` columns).
        n_passes: Passes over the data so far (one per :meth:`matmat`).

    Not thread-safe: a product switches the model to eval mode and back, and the counters are
    plain attributes, so threads sharing a model must serialise their products (the sketch
    pipeline's tasks hold one lock per worker process around them).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> H = CurvatureOperator(model, x, y, kind="ggn", dtype=torch.float64)
        >>> V = torch.randn(H.n_params, 3, dtype=torch.float64)
        >>> HV = H @ V  # one pass over the data for the 3 vectors
        >>> bool(torch.allclose(V.T @ HV, HV.T @ V))  # symmetric
        True
        >>> (H.n_products, H.n_passes)
        (3, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        *,
        kind: CurvatureKind = "hessian",
        loss: str = "cross_entropy",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise UserInputError(f"kind={kind!r} must be one of {_KINDS}")
        self._loss = get_loss(loss)
        dtype, device = check_dtype_device(model, dtype, device)
        check_batch_size(batch_size)
        self._x = as_input(x)
        n = self._x.shape[0]
        self._y = self._loss.check_targets(y, n)
        self.kind = kind
        self.dtype, self.device = dtype, device
        self.n_examples = n
        self.batch_size = batch_size or min(n, MAX_DEFAULT_BATCH)
        with eval_mode(model), torch.no_grad():
            self._fmodel = FunctionalModel(model, dtype, device)
            probe = self._fmodel.forward(cast_input(self._x[:1], dtype, device))
        check_logits(probe, 1)
        self._loss.check_against_outputs(self._y, probe.shape[1])
        self._theta = flat_tensor(model, dtype=dtype, device=device)
        self.n_params = int(self._theta.numel())
        self.n_products = 0
        self.n_passes = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_params, self.n_params)

    def matmat(self, V: Matrix) -> Matrix:
        """``A V`` for ``V`` of shape ``(P,)`` or ``(P, k)``, in one pass over the data.

        Args:
            V: numpy array or torch tensor; cast to the compute dtype and device.

        Returns:
            ``A V`` with the shape and container type of ``V``: a numpy array of ``V``'s dtype,
            or a tensor of ``V``'s dtype and device (the compute dtype for integer ``V``).
        """
        is_numpy = isinstance(V, np.ndarray)
        if not (is_numpy or isinstance(V, torch.Tensor)):
            raise UserInputError(f"V must be a numpy array or a torch tensor, got {type(V)}")
        vectors = torch.as_tensor(V)
        if vectors.ndim not in (1, 2) or vectors.shape[0] != self.n_params:
            raise UserInputError(
                f"V must have shape (P,) or (P, k) with P={self.n_params}, got "
                f"{tuple(vectors.shape)}"
            )
        block = vectors.reshape(self.n_params, -1).to(device=self.device, dtype=self.dtype)
        product = self._apply(block) if block.shape[1] else torch.zeros_like(block)
        product = product.reshape(vectors.shape)
        self.n_products += block.shape[1]
        self.n_passes += 1
        out_dtype = vectors.dtype if vectors.is_floating_point() else self.dtype
        if is_numpy:
            return product.to("cpu", out_dtype).numpy()
        return product.to(vectors.device if vectors.is_floating_point() else self.device, out_dtype)

    def __matmul__(self, V: Matrix) -> Matrix:
        return self.matmat(V)

    def to_scipy(self) -> LinearOperator:
        """This operator as a symmetric ``scipy.sparse.linalg.LinearOperator`` (numpy in/out)."""
        dtype = np.dtype(_NUMPY_DTYPES.get(self.dtype, np.float64))
        return LinearOperator(
            self.shape,
            matvec=self.matmat,
            rmatvec=self.matmat,
            matmat=self.matmat,
            rmatmat=self.matmat,
            dtype=dtype,
        )

    # -- one data pass -------------------------------------------------------------------------
    def _apply(self, block: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V = block`` of shape ``(P, k)``: the batches' products summed in order.

        The vectors are vmapped as the contiguous rows of ``Vᵀ`` (each vector's per-tensor
        pieces then are contiguous views rather than strided ones; ~5-10% faster products)."""
        product = self._hessian_batch if self.kind == "hessian" else self._ggn_batch
        rows = block.T.contiguous()
        out = torch.zeros_like(rows)
        with eval_mode(self._fmodel.model):
            for sl in batches(self.n_examples, self.batch_size):
                xb = cast_input(self._x[sl], self.dtype, self.device)
                yb = self._y[sl].to(self.device)
                out += product(xb, yb, rows)
        return out.T

    def _hessian_batch(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``Vᵀ ∇²_θ [(1/n) Σ_{i ∈ batch} ℓ_i]`` by ``jvp`` of ``grad``, vmapped over the rows."""
        n, fmodel, loss = self.n_examples, self._fmodel, self._loss

        def batch_loss(theta: torch.Tensor) -> torch.Tensor:
            return loss.total(fmodel.forward_flat(x, theta), y) / n

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return jvp(grad(batch_loss), (self._theta,), (v,))[1]

        return vmap(hvp)(rows)

    def _ggn_batch(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``Vᵀ (1/n) Σ_{i ∈ batch} J_iᵀ H_ℓ(z_i) J_i``: ``jvp``, closed-form ``H_ℓ``, ``vjp``."""
        fmodel, theta = self._fmodel, self._theta

        def outputs(t: torch.Tensor) -> torch.Tensor:
            return fmodel.forward_flat(x, t)

        z, pullback = vjp(outputs, theta)
        jv = vmap(lambda v: jvp(outputs, (theta,), (v,))[1])(rows)  # (k, b, C)
        u = self._loss.output_hessian_matmat(z.detach(), y, jv) / self.n_examples
        return vmap(pullback)(u)[0]
