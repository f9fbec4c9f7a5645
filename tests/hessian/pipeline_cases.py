"""Tiny runs and their dense Hessians (float64 oracles) for the Hessian pipeline tests."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from curvlake.lake import Lake
from curvlake.lake.checkpoints import load_model
from curvlake.pipelines.train import cached_run_splits
from tests.pipelines.contract import train_tiny_run

#: Softmax regression on digits (650 parameters): on n examples its Hessian has rank at most
#: 9 n, so a sketch with k above that recovers the nonzero spectrum exactly.
LINEAR_RUN = {"model_params": {"widths": []}}


def train_linear_run(lake: Lake) -> str:
    return train_tiny_run(lake, **LINEAR_RUN)


def dense_hessian(lake: Lake, run_id: str, rows, checkpoint: int = -1, split: str = "train"):
    """The Hessian of the mean cross-entropy over ``rows`` of ``split`` at a checkpoint, on flat
    θ (``torch.autograd.functional.hessian``, float64, eval mode)."""
    model = load_model(lake, run_id, checkpoint).double().eval()
    data = cached_run_splits(lake.url, run_id).split(split)
    x = torch.as_tensor(data.x[rows], dtype=torch.float64)
    y = torch.as_tensor(data.y[rows])
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = flat[offset : offset + size].view(shape)
            offset += size
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    h = torch.autograd.functional.hessian(mean_loss, theta, vectorize=True).numpy()
    return 0.5 * (h + h.T)


def top_eigenpairs(h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` eigenpairs of largest |λ| of a dense symmetric matrix."""
    lam, v = np.linalg.eigh(h)
    order = np.argsort(-np.abs(lam), kind="stable")[:k]
    return lam[order], v[:, order]


def projector_distance(u1: np.ndarray, u2: np.ndarray) -> float:
    """``‖U₁U₁ᵀ − U₂U₂ᵀ‖₂`` (the sine of the largest principal angle)."""
    return float(np.linalg.norm(u1 @ u1.T - u2 @ u2.T, 2))
