"""Tiny float64 problems for the autodiff tests, and dense autograd oracles.

The oracles use only ``torch.func.functional_call`` and plain ``torch.autograd`` (one example
or one row at a time, dense Jacobians and Hessians): no vmap, no hooks, nothing from
:mod:`curvlake.autodiff`.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from curvlake.nn.params import flat_tensor, unflatten

DTYPE = torch.float64
N_EXAMPLES = 7


def _make(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    torch.manual_seed(4321)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        shape, C = (5,), 4
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 2, 2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        )
        shape, C = (2, 4, 4), 3
    elif name == "bn_dropout":  # eval mode: running statistics and no dropout
        model = nn.Sequential(
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
            nn.Tanh(),
            nn.Dropout(0.5),
            nn.Linear(6, 3),
        )
        model[1].running_mean.normal_(0.0, 0.5, generator=g)
        model[1].running_var.uniform_(0.5, 2.0, generator=g)
        shape, C = (4,), 3
    else:
        raise KeyError(name)
    with torch.no_grad():  # larger weights than the default init: well-spread probabilities
        for p in model.parameters():
            p.mul_(2.0)
    x = torch.randn(N_EXAMPLES, *shape, generator=g)
    y = torch.randint(0, C, (N_EXAMPLES,), generator=g)
    return model.to(DTYPE), x.to(DTYPE), y


CASES = ("mlp", "cnn", "bn_dropout")


def make_case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, x, y)`` in float64 with 7 examples; a fresh copy every call."""
    model, x, y = _cached(name)
    return copy.deepcopy(model), x.clone(), y.clone()


@functools.cache
def _cached(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return _make(name)


def outputs_at(model: nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode outputs of ``model`` at the flat parameters ``theta``."""
    model = copy.deepcopy(model).eval()
    tensors = {**dict(model.named_buffers()), **unflatten(model, theta)}
    return torch.func.functional_call(model, tensors, (x,))


def loop_per_example_grads(
    model: nn.Module, x: torch.Tensor, cotangents: torch.Tensor
) -> torch.Tensor:
    """``G[i, k] = J_iᵀ v_ik`` by one autograd backward per example and row: ``(n, K, P)``."""
    theta = flat_tensor(model).requires_grad_(True)
    n, K, _ = cotangents.shape
    rows = []
    for i in range(n):
        z = outputs_at(model, theta, x[i : i + 1])[0]
        rows.append(
            torch.stack(
                [
                    torch.autograd.grad(z, theta, cotangents[i, k], retain_graph=True)[0]
                    for k in range(K)
                ]
            )
        )
    return torch.stack(rows)


def loop_loss_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇_θ CE(f(x_i), y_i)`` for each example alone, by autograd: ``(n, P)``."""
    theta = flat_tensor(model).requires_grad_(True)
    grads = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(outputs_at(model, theta, x[i : i + 1]), y[i : i + 1])
        grads.append(torch.autograd.grad(loss, theta)[0])
    return torch.stack(grads)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇²_θ (1/n) Σ_i CE(f(x_i), y_i)`` by ``torch.autograd.functional.hessian``: ``(P, P)``."""
    theta = flat_tensor(model)
    return torch.autograd.functional.hessian(
        lambda t: F.cross_entropy(outputs_at(model, t, x), y), theta
    )


def dense_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i`` from the dense output Jacobian."""
    theta = flat_tensor(model)
    jac = torch.autograd.functional.jacobian(lambda t: outputs_at(model, t, x), theta)
    p = torch.softmax(outputs_at(model, theta, x), dim=-1)
    h_loss = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("icp,icd,idq->pq", jac, h_loss, jac) / x.shape[0]
