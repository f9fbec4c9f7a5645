"""Planted data for the saturation tests: exact-rank features and tiny conv nets."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def orthonormal_rows(rank: int, dim: int, seed: int) -> np.ndarray:
    """``(rank, dim)`` matrix with orthonormal rows."""
    q, _ = np.linalg.qr(np.random.default_rng([seed, 1]).standard_normal((dim, rank)))
    return q.T


def planted_rank(
    n: int, rank: int, dim: int, seed: int = 0, *, equal: bool = False, offset: float = 0.0
) -> np.ndarray:
    """``(n, dim)`` rows spanning a ``rank``-dimensional affine subspace.

    ``equal=True`` whitens the latent factors exactly, so the population covariance (ddof=0)
    has ``rank`` eigenvalues equal to 1 (up to rounding) and ``dim - rank`` zeros.
    """
    rng = np.random.default_rng([seed, 0])
    z = rng.standard_normal((n, rank))
    if equal:
        z -= z.mean(axis=0)
        q, _ = np.linalg.qr(z)
        z = q * np.sqrt(n)
    return z @ orthonormal_rows(rank, dim, seed) + offset + rng.normal(size=dim)


class TinyCNN(nn.Module):
    """conv(3->6) -> ReLU -> maxpool -> conv(6->5) -> global pool -> linear(5->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.gap(self.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))
