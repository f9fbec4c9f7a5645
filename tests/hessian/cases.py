"""Synthetic symmetric matrices with known spectra (dense float64 oracles)."""

from __future__ import annotations

import numpy as np


def random_orthogonal(dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal ``dim × dim`` matrix."""
    q, r = np.linalg.qr(np.random.default_rng([seed, 7]).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def symmetric(eigenvalues: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``A = V diag(λ) Vᵀ`` with Haar-random ``V``; returns ``(A, V)``."""
    v = random_orthogonal(eigenvalues.size, seed)
    a = (v * eigenvalues) @ v.T
    return 0.5 * (a + a.T), v


def low_rank_indefinite(dim: int, rank: int) -> np.ndarray:
    """``rank`` non-zero eigenvalues of alternating sign and distinct magnitudes."""
    lam = np.zeros(dim)
    mags = np.linspace(10.0, 1.0, rank)
    lam[:rank] = mags * np.where(np.arange(rank) % 2, -1.0, 1.0)
    return lam


def poly_decay(dim: int, decay: float = 1.0, signed: bool = True) -> np.ndarray:
    """``|λ_j| = j^{-decay}``, alternating signs if ``signed`` (Tropp et al. 2019 §7.3)."""
    j = np.arange(1, dim + 1, dtype=np.float64)
    return j**-decay * (np.where(j % 2, 1.0, -1.0) if signed else 1.0)


def exp_decay(dim: int, rate: float = 0.25, signed: bool = True) -> np.ndarray:
    """``|λ_j| = 10^{-rate·(j-1)}``, alternating signs if ``signed``."""
    j = np.arange(dim, dtype=np.float64)
    return 10.0 ** (-rate * j) * (np.where(j % 2, -1.0, 1.0) if signed else 1.0)


def tail_energy(eigenvalues: np.ndarray, r: int) -> float:
    """``τ²_{r+1} = Σ_{j>r} λ_j²`` (by magnitude)."""
    sq = np.sort(eigenvalues**2)[::-1]
    return float(sq[r:].sum())


def reconstruct(eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> np.ndarray:
    return (eigenvectors * eigenvalues) @ eigenvectors.T


def relative_error(a: np.ndarray, a_hat: np.ndarray) -> float:
    return float(np.linalg.norm(a - a_hat) / np.linalg.norm(a))


class CountingOperator:
    """``X -> A X`` that counts calls (data passes) and columns (HVPs)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.hvps = 0
        self.passes = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.hvps += x.shape[1]
        self.passes += 1
        return self.a @ x
