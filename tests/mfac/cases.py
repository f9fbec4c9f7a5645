"""Tiny gradient windows and dense float64 oracles shared by the M-FAC tests."""

from __future__ import annotations

import numpy as np


def window(m: int, d: int, seed: int = 0, *, dtype=np.float64) -> np.ndarray:
    """m gradients of d parameters with norms about 1 (so λ is on the scale of GᵀG/m)."""
    rng = np.random.default_rng([seed, m, d])
    return (rng.normal(size=(m, d)) / np.sqrt(d)).astype(dtype)


def dense_fisher(grads: np.ndarray, damp: float, n_grads: int | None = None) -> np.ndarray:
    """F = λI + GᵀG/n, formed explicitly in float64."""
    grads = np.asarray(grads, dtype=np.float64)
    n = grads.shape[0] if n_grads is None else n_grads
    return damp * np.eye(grads.shape[1]) + grads.T @ grads / n


def dense_inverse(grads: np.ndarray, damp: float, n_grads: int | None = None) -> np.ndarray:
    return np.linalg.inv(dense_fisher(grads, damp, n_grads))


def block_diagonal_inverse(grads: np.ndarray, damp: float, block_size: int) -> np.ndarray:
    """Dense inverse of blockdiag(λI + G_bᵀG_b/m) over consecutive blocks (short tail)."""
    d = grads.shape[1]
    out = np.zeros((d, d))
    for start in range(0, d, block_size):
        stop = min(start + block_size, d)
        out[start:stop, start:stop] = dense_inverse(grads[:, start:stop], damp, grads.shape[0])
    return out


def sherman_morrison_ihvp(grads: np.ndarray, x: np.ndarray, damp: float) -> np.ndarray:
    """The paper's static recursion (v_i, den_i) with F_0 = λI, as an independent oracle:
    v_i = λ⁻¹g_i − Σ_{k<i} v_k (v_kᵀg_i)/den_k, den_i = m + g_iᵀv_i,
    F⁻¹x = λ⁻¹x − Σ_i v_i (v_iᵀx)/den_i."""
    grads = np.asarray(grads, dtype=np.float64)
    m = grads.shape[0]
    vs, dens = [], []
    for g in grads:
        v = g / damp
        for vk, dk in zip(vs, dens, strict=True):
            v = v - vk * (vk @ g) / dk
        vs.append(v)
        dens.append(m + g @ v)
    out = x / damp
    for v, den in zip(vs, dens, strict=True):
        out = out - np.multiply.outer(v, v @ x) / den
    return out


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
