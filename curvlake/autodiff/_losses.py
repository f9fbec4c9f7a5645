"""Losses on the model output, with the output-space derivatives the other modules need.

A loss here is a per-example function ``ℓ(z, y)`` of the model output ``z ∈ R^C`` and a target
``y``. :mod:`curvlake.autodiff.per_example` needs its gradient ``∂ℓ/∂z`` (the cotangent of a
per-example loss gradient), :mod:`curvlake.autodiff.curvature` its sum (for the Hessian) and
the product with its output Hessian ``H_ℓ = ∂²ℓ/∂z²`` (for the GGN). A new loss (e.g. MSE,
``ℓ = ½‖z − y‖²`` with ``∂ℓ/∂z = z − y`` and ``H_ℓ = I``) is one more class in ``LOSSES``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from curvlake.errors import UserInputError


class Loss(Protocol):
    """What the derivative kernels need from a per-example loss ``ℓ(z, y)``."""

    name: str

    def check_targets(self, y: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
        """Validated targets of ``n`` examples (before any forward pass)."""
        ...

    def check_against_outputs(self, y: torch.Tensor, n_outputs: int) -> None:
        """Validate targets against the model's output width ``C``."""
        ...

    def total(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``Σ_i ℓ(z_i, y_i)`` (a scalar) for outputs ``z`` of shape ``(n, C)``."""
        ...

    def output_grad(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``∂ℓ(z_i, y_i)/∂z_i`` for every example: ``(n, C)``."""
        ...

    def output_hessian_matmat(
        self, z: torch.Tensor, y: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """``H_ℓ(z_i, y_i) u_i`` for ``u`` of shape ``(..., n, C)``."""
        ...


class CrossEntropy:
    """Softmax cross-entropy ``ℓ(z, y) = −log softmax(z)_y`` with integer class targets.

    ``∂ℓ/∂z = p − e_y`` and ``H_ℓ = diag(p) − p pᵀ`` with ``p = softmax(z)`` (independent of
    ``y``), so ``H_ℓ u = p ⊙ u − p (pᵀ u)``.
    """

    name = "cross_entropy"

    def check_targets(self, y: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
        y = torch.as_tensor(y).detach()
        if y.shape != (n,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise UserInputError(
                f"y must hold one integer class per example, shape ({n},); got "
                f"{tuple(y.shape)} {y.dtype}"
            )
        return y.to(torch.int64)

    def check_against_outputs(self, y: torch.Tensor, n_outputs: int) -> None:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
            raise UserInputError(
                f"y must lie in [0, {n_outputs}) for a model with {n_outputs} outputs; got "
                f"range [{int(y.min())}, {int(y.max())}]"
            )

    def total(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y, reduction="sum")

    def output_grad(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z, dim=-1)
        return p - F.one_hot(y, z.shape[-1]).to(p.dtype)

    def output_hessian_matmat(
        self, z: torch.Tensor, y: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        p = torch.softmax(z, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)


LOSSES: dict[str, Loss] = {"cross_entropy": CrossEntropy()}


def get_loss(name: str) -> Loss:
    """The loss called ``name``, or a :class:`UserInputError` listing the known ones."""
    if name not in LOSSES:
        raise UserInputError(f"loss={name!r} must be one of {tuple(LOSSES)}")
    return LOSSES[name]
