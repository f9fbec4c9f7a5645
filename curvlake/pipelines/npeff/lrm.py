"""LRM-NPEFF: non-negative factorization of low-rank per-example Fishers.

(Matena & Raffel, "NPEFF: Non-Negative Per-Example Fisher Factorization", arXiv 2310.04649.)
Example ``i`` has the PEF ``F_i = A_iᵀ A_i`` with ``A_i ∈ R^{C×P}`` (one row per class, the
layout of :mod:`.pefs`), normalised to unit Frobenius norm by dividing ``A_i`` by
``√‖F_i‖_F``. The model is a non-negative combination of rank-one "pseudo-Fisher" components:

    min_{W ≥ 0, G} Σ_i ‖F_i − Σ_j W_ij g_j g_jᵀ‖²_F + λ ‖G Gᵀ − s I‖²_F,   G = [g_j] ∈ R^{r×P'}.

P×P is never formed. Stack the ``A_i`` into ``X ∈ R^{nC×P'}`` (row ``i·C + c``), then with
``AG = X Gᵀ`` (nC×r), ``N_ij = Σ_c AG²_{(i,c), j} = ‖A_i g_j‖²``, ``S = G Gᵀ`` and
``K = S ∘ S``:

    loss = Σ_i ‖F_i‖² − 2 ⟨W, N⟩ + ⟨WᵀW, K⟩ + λ ‖S − sI‖²,
    ∇_G  = 4 [(WᵀW ∘ S) G − (W ⊛ AG)ᵀ X] + 4 λ (S − sI) G,

with ``(W ⊛ AG)_{(i,c), j} = W_ij AG_{(i,c), j}``. The constant ``Σ_i ‖F_i‖² = Σ_i
‖A_i A_iᵀ‖²_F`` (C×C Grams) is computed exactly and included in the reported loss (the
reference implementation's ``compute_tr_xx`` over-counts it).

Updates (reference schedule): ``n_iters_g_only`` gradient steps on G with W frozen at its random
init, then ``n_iters_joint`` alternating steps: W by multiplicative updates
``W ← W ⊙ N / (W K + ε)``, then G by a gradient step (plain, as in the reference, or Adam:
Kingma & Ba, "Adam: A method for stochastic optimization", ICLR 2015). Like D-NPEFF
(:mod:`.nmf`), X is held by column blocks and each step is one pass over them: ``AG`` and ``S``
are sums over blocks, the G update of a block is local, and the pass also emits the new ``AG``,
``S``. State is explicit (:class:`LrmState`) for checkpoint/resume.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError
from curvlake.pipelines.npeff import nmf as _nmf
from curvlake.pipelines.npeff.coeffs import Method, coeffs_dask, nnls_gram

__all__ = [
    "LrmConfig",
    "LrmPefMatrix",
    "LrmState",
    "expand_lrm",
    "fit_lrm",
    "fit_lrm_coeffs",
    "fit_lrm_coeffs_dask",
    "fit_lrm_dask",
    "fit_lrm_expansion",
    "init_g_columns",
    "iter_lrm_dask",
    "lrm_block_grad",
    "lrm_block_stats",
    "lrm_init",
    "lrm_init_dask",
    "lrm_loss",
    "lrm_n_matrix",
    "lrm_state_from_checkpoint",
    "lrm_step",
    "lrm_step_dask",
    "lrm_trace_const",
    "lrm_trace_const_dask",
    "preprocess_lrm_pefs",
]

Optimizer = Literal["gd", "adam"]


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LrmPefMatrix:
    """Preprocessed LRM-PEFs: ``X`` (nC×P') by column blocks, row ``i·C + c`` = class c of i.

    Attributes:
        blocks: column blocks (CSR or dense), in order.
        kept_columns: int64 ``(P',)`` new column → original parameter index.
        n_params: original ``P``.
        n_classes: ``C``.
        tr_per_example: ``(n,)`` float64 ``‖F̂_i‖²_F = ‖Â_i Â_iᵀ‖²_F`` of the kept, normalised
            factors; ``tr_const = tr_per_example.sum()`` is the loss constant.
    """

    blocks: tuple[Any, ...]
    kept_columns: np.ndarray
    n_params: int
    n_classes: int
    tr_per_example: np.ndarray

    @property
    def n_examples(self) -> int:
        return self.blocks[0].shape[0] // self.n_classes

    @property
    def tr_const(self) -> float:
        return float(self.tr_per_example.sum())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks[0].shape[0], int(sum(b.shape[1] for b in self.blocks)))

    def to_dask(self) -> Any:
        return _nmf.column_blocks_to_dask(self.blocks)


def lrm_trace_const(X: Any, n_classes: int) -> np.ndarray:
    """``‖A_i A_iᵀ‖²_F`` per example from the stacked ``X`` (nC×P', CSR or dense), float64.

    Uses the C×C Gram of each example, entry ``(c, c')`` = row-wise ``Σ_p X_{ic,p} X_{ic',p}``
    (``C(C+1)/2`` sparse elementwise products, each ``O(nnz / C)``).
    """
    C = n_classes
    if sp.issparse(X):
        Xs = sp.csr_matrix(X, dtype=np.float64)
        rows = [Xs[c::C] for c in range(C)]
        out = np.zeros(X.shape[0] // C)
        for c in range(C):
            for d in range(c, C):
                g = np.asarray(rows[c].multiply(rows[d]).sum(axis=1)).ravel()
                out += (1.0 if c == d else 2.0) * g * g
        return out
    xp = get_namespace(X)
    A = xp.asarray(X, dtype=xp.float64).reshape(X.shape[0] // C, C, -1)
    gr = A @ xp.swapaxes(A, 1, 2)
    return to_numpy((gr * gr).sum(axis=(1, 2)))


def preprocess_lrm_pefs(
    values: Any,
    class_indices: Any | None = None,
    param_indices: Any | None = None,
    frobenius_norm: Any | None = None,
    *,
    n_params: int | None = None,
    n_classes: int | None = None,
    min_nnz: int = 1,
    block_size: int | None = None,
    dense_blocks: bool = False,
    dtype: Any = None,
    norm_eps: float = _nmf.NORM_EPS,
) -> LrmPefMatrix:
    """Normalise, stack and prune LRM-PEFs (the sparse form of :func:`.pefs.topk_sparsify_lowrank`).

    ``A_i`` is divided by ``√(‖F_i‖_F + norm_eps)`` (``frobenius_norm`` of the dense factors,
    so the kept part has ``‖F̂_i‖ ≤ 1``), stacked into ``X`` (row ``i·C + c``), and parameters
    with fewer than ``min_nnz`` nonzeros are dropped.

    Args:
        values: ``(n, k)`` signed values, or dense factors ``(n, C, P)`` when the index arrays
            are ``None``.
        class_indices, param_indices: int ``(n, k)`` class and parameter of each value.
        frobenius_norm: ``(n,)`` ``‖A_iᵀA_i‖_F`` of the dense factors (default: computed from
            the given values).
        n_params, n_classes: ``P`` and ``C`` (required for the sparse form).
        min_nnz, block_size, dense_blocks, dtype, norm_eps: as in :func:`.nmf.preprocess_pefs`.
    """
    if min_nnz < 1:
        raise UserInputError(f"min_nnz must be >= 1, got {min_nnz}")
    if class_indices is None and param_indices is None:
        a = np.asarray(values)
        if a.ndim != 3:
            raise UserInputError(f"dense LRM-PEFs must be (n, C, P), got shape {a.shape}")
        n, C, P = a.shape
        X = sp.csr_matrix(a.reshape(n * C, P))
    else:
        if class_indices is None or param_indices is None:
            raise UserInputError("give both class_indices and param_indices (or neither)")
        if n_params is None or n_classes is None:
            raise UserInputError("n_params and n_classes are required for the sparse form")
        v, ci, pi = (np.asarray(x) for x in (values, class_indices, param_indices))
        if v.ndim != 2 or v.shape != ci.shape or v.shape != pi.shape:
            raise UserInputError(
                f"values, class_indices, param_indices must be (n, k); got {v.shape}, "
                f"{ci.shape}, {pi.shape}"
            )
        if v.size and (ci.min() < 0 or ci.max() >= n_classes):
            raise UserInputError(f"class_indices must lie in [0, n_classes={n_classes})")
        if v.size and (pi.min() < 0 or pi.max() >= n_params):
            raise UserInputError(f"param_indices must lie in [0, n_params={n_params})")
        n, C, P = v.shape[0], int(n_classes), int(n_params)
        rows = (np.arange(n)[:, None] * C + ci).ravel()
        X = sp.csr_matrix((v.ravel().copy(), (rows, pi.ravel())), shape=(n * C, P))
    if n_params is not None and n_params != P:
        raise UserInputError(f"n_params={n_params} does not match the data ({P})")
    if dtype is None:
        dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    X = X.astype(dtype)
    X.sum_duplicates()
    X.eliminate_zeros()
    if frobenius_norm is None:
        norms = np.sqrt(lrm_trace_const(X, C))
    else:
        norms = np.asarray(frobenius_norm, dtype=np.float64).ravel()
        if norms.shape != (n,):
            raise UserInputError(f"frobenius_norm must be ({n},), got {norms.shape}")
    scale = np.repeat(1.0 / np.sqrt(norms + norm_eps), C)
    X = sp.csr_matrix(sp.diags(scale) @ X).astype(dtype)
    counts = np.bincount(X.indices, minlength=P)
    kept = np.flatnonzero(counts >= min_nnz).astype(np.int64)
    X = X.tocsc()[:, kept].tocsr()
    tr = lrm_trace_const(X, C)
    X = X.tocsc()
    blocks = []
    for s, e in _nmf._block_bounds(len(kept), block_size):
        blk = X[:, s:e].tocsr()
        blk.sort_indices()
        blocks.append(blk.toarray() if dense_blocks else blk)
    return LrmPefMatrix(tuple(blocks), kept, int(P), int(C), tr)


def _trace_task(X_b: Any, C: int) -> Any:
    n = X_b.shape[0] // C
    if sp.issparse(X_b):
        Xs = sp.csr_matrix(X_b, dtype=np.float64)
        out = np.zeros((1, n, C, C))
        rows = [Xs[c::C] for c in range(C)]
        for c in range(C):
            for d in range(c, C):
                g = np.asarray(rows[c].multiply(rows[d]).sum(axis=1)).ravel()
                out[0, :, c, d] = g
                out[0, :, d, c] = g
        return out
    xp = get_namespace(X_b)
    A = xp.asarray(X_b, dtype=xp.float64).reshape(n, C, -1)
    return (A @ xp.swapaxes(A, 1, 2))[None]


def lrm_trace_const_dask(X: Any, n_classes: int) -> Any:
    """Per-example ``‖A_i A_iᵀ‖²_F`` (n,) from a column-chunked Dask ``X``.

    Sums the per-block C×C Grams (an ``n × C × C`` partial per block, so meant for small C).
    """
    import dask.array as da

    C = n_classes
    X = _check_dask_X(X, C)
    n = X.shape[0] // C
    parts = da.blockwise(
        _trace_task,
        "bxyz",
        X,
        "ib",
        C,
        None,
        new_axes={"x": n, "y": C, "z": C},
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0)),
    )
    g = parts.sum(axis=0, split_every=8)
    return (g * g).sum(axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# Config, init, state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LrmConfig:
    """Settings of an LRM-NPEFF fit (defaults of the reference implementation where it has one).

    Attributes:
        n_components: ``r``.
        n_iters_g_only: G-only steps with W frozen at its random init (first phase). Default
            20: started jointly from a random G, which explains almost none of the data, the
            first MU step drives W to ≈ 0, where the G gradient (∝ W) vanishes and the fit
            stalls at the trivial solution (relative loss 1).
        n_iters_joint: joint W (MU) + G (gradient) steps (second phase).
        learning_rate: G step size in the joint phase. ``gd``: the step on the loss averaged
            over the n examples, ``G ← G − (learning_rate / n) ∇_G`` with ``∇_G`` the gradient
            of the summed loss above, so that one value suits any n (the reference's
            ``--learning_rate_G`` steps on the sum: it is ``learning_rate / n``); default 0.3.
            ``adam``: Adam's step size; default 1e-3.
        learning_rate_g_only: G step size in the G-only phase (default: ``learning_rate``).
        optimizer: ``"gd"`` (reference) or ``"adam"``.
        adam_betas, adam_eps: Adam's moment decays and denominator offset.
        ortho_strength: ``λ`` of ``λ‖GGᵀ − sI‖²`` (0: off).
        ortho_scale: ``s`` (default ``2 / r``).
        mu_eps: MU denominator offset (reference 1e-9).
        seed: seed of the random init (W from ``default_rng([seed, 0])``, G per column tile).
        tol: stop the joint phase when the loss decreases by less than ``tol`` times its
            previous value in one step (0: off).
    """

    n_components: int
    n_iters_g_only: int = 20
    n_iters_joint: int = 100
    learning_rate: float | None = None
    learning_rate_g_only: float | None = None
    optimizer: Optimizer = "gd"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    ortho_strength: float = 0.0
    ortho_scale: float | None = None
    mu_eps: float = 1e-9
    seed: int = 0
    tol: float = 0.0

    def __post_init__(self) -> None:
        def number(name: str, kind: type, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an integer" if kind is numbers.Integral else "a number"
                raise UserInputError(f"{name} must be {what}, got {value!r}")

        if self.learning_rate is None:  # frozen dataclass: resolve the default in place
            object.__setattr__(self, "learning_rate", 0.3 if self.optimizer == "gd" else 1e-3)
        for name in ("n_components", "n_iters_g_only", "n_iters_joint", "seed"):
            number(name, numbers.Integral)
        for name in ("learning_rate", "adam_eps", "ortho_strength", "mu_eps", "tol"):
            number(name, numbers.Real)
        for name in ("learning_rate_g_only", "ortho_scale"):
            number(name, numbers.Real, optional=True)
        betas = self.adam_betas
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)
        ):
            raise UserInputError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        if self.n_components < 1:
            raise UserInputError(f"n_components must be >= 1, got {self.n_components}")
        if self.n_iters_g_only < 0 or self.n_iters_joint < 0:
            raise UserInputError("n_iters_g_only and n_iters_joint must be >= 0")
        if self.optimizer not in ("gd", "adam"):
            raise UserInputError(f"optimizer must be 'gd' or 'adam', got {self.optimizer!r}")
        for name in ("learning_rate", "mu_eps", "adam_eps", "ortho_strength", "tol"):
            if not getattr(self, name) >= 0:
                raise UserInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate_g_only is not None and not self.learning_rate_g_only >= 0:
            raise UserInputError("learning_rate_g_only must be >= 0")

    @property
    def s(self) -> float:
        return 2.0 / self.n_components if self.ortho_scale is None else float(self.ortho_scale)


@dataclass
class LrmState:
    """Everything needed to continue an LRM-NPEFF fit.

    Attributes:
        W: ``(n, r)`` float64.
        G: ``(r, P')`` NumPy/CuPy (in-memory) or Dask (column chunks like X).
        AG: ``X Gᵀ`` (nC×r, float64) for the current G.
        S: ``G Gᵀ`` (r×r, float64).
        tr_const: ``Σ_i ‖F̂_i‖²``.
        n_classes: ``C``.
        iteration: completed steps (G-only and joint together).
        losses: full objective (with the true constant and the penalty) at init and after each
            step.
        rel_losses: ``√(data loss / tr_const)`` at init and after each step.
        adam_m, adam_v: Adam moments (like G) or ``None``; ``adam_t``: Adam step count.
        converged: the joint-phase tolerance test passed.
    """

    W: np.ndarray
    G: Any
    AG: np.ndarray
    S: np.ndarray
    tr_const: float
    n_classes: int
    iteration: int = 0
    losses: list[float] = field(default_factory=list)
    rel_losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    adam_m: Any = None
    adam_v: Any = None
    adam_t: int = 0
    converged: bool = False

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(arrays, meta)`` for persistence; rebuild with :func:`lrm_state_from_checkpoint`.

        ``arrays``: ``W``, ``AG``, ``S`` (NumPy), ``G`` and, with Adam, ``adam_m``/``adam_v``
        (NumPy/CuPy or Dask: store with ``da.store``).
        """
        arrays = {"W": self.W, "G": self.G, "AG": self.AG, "S": self.S}
        if self.adam_m is not None:
            arrays["adam_m"], arrays["adam_v"] = self.adam_m, self.adam_v
        meta = {
            "iteration": int(self.iteration),
            "losses": [float(x) for x in self.losses],
            "rel_losses": [float(x) for x in self.rel_losses],
            "seconds": [float(x) for x in self.seconds],
            "adam_t": int(self.adam_t),
            "converged": bool(self.converged),
            "tr_const": float(self.tr_const),
            "n_classes": int(self.n_classes),
        }
        return arrays, meta


def init_g_columns(
    seed: int,
    n_components: int,
    n_cols_total: int,
    start: int,
    stop: int,
    dtype: Any = None,
    stream: int = 1,
) -> np.ndarray:
    """Columns ``[start, stop)`` of the G init ``N(0, 2 / (r P'))``, chunking-invariant.

    Column tile ``t`` (width :data:`.nmf.INIT_TILE`) comes from ``default_rng([seed, stream,
    t])``; the reference's variance ``2/(rP')`` gives reconstructions of roughly unit norm.
    """
    T = _nmf.INIT_TILE
    out = np.empty((n_components, stop - start), dtype=np.float64)
    sd = math.sqrt(2.0 / (n_components * max(n_cols_total, 1)))
    t0, t1 = start // T, ((stop - 1) // T + 1 if stop > start else 0)
    for t in range(t0, t1):
        tile = np.random.default_rng([seed, stream, t]).standard_normal((n_components, T))
        lo, hi = max(start, t * T), min(stop, (t + 1) * T)
        out[:, lo - start : hi - start] = tile[:, lo - t * T : hi - t * T] * sd
    return out.astype(dtype or np.float64, copy=False)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def lrm_block_stats(X_b: Any, G_b: Any) -> tuple[Any, Any]:
    """``(X_b G_bᵀ, G_b G_bᵀ)`` of one column block (float64)."""
    return _nmf.block_stats(X_b, G_b)


def lrm_n_matrix(AG: Any, n_classes: int) -> Any:
    """``N_ij = Σ_c AG²_{(i,c), j} = ‖A_i g_j‖²`` (n×r)."""
    nC, r = AG.shape
    return (AG * AG).reshape(nC // n_classes, n_classes, r).sum(axis=1)


def lrm_loss(
    tr_const: float,
    W: Any,
    AG: Any,
    S: Any,
    n_classes: int,
    ortho_strength: float = 0.0,
    ortho_scale: float = 0.0,
) -> tuple[float, float]:
    """``(objective, data loss)``: ``data = tr_const − 2⟨W, N⟩ + ⟨WᵀW, S∘S⟩``, objective adds
    ``λ‖S − sI‖²``."""
    W = np.asarray(to_numpy(W), dtype=np.float64)
    AG, S = np.asarray(to_numpy(AG)), np.asarray(to_numpy(S))
    N = lrm_n_matrix(AG, n_classes)
    data = float(tr_const - 2.0 * np.vdot(W, N) + np.vdot(W.T @ W, S * S))
    reg = 0.0
    if ortho_strength > 0:
        D = S - ortho_scale * np.eye(S.shape[0])
        reg = float(ortho_strength * np.vdot(D, D))
    return data + reg, data


def _rel(tr_const: float, data: float) -> float:
    return math.sqrt(max(data, 0.0) / tr_const) if tr_const > 0 else 0.0


def lrm_block_grad(
    X_b: Any,
    G_b: Any,
    W: Any,
    AG: Any,
    S: Any,
    n_classes: int,
    ortho_strength: float = 0.0,
    ortho_scale: float = 0.0,
) -> Any:
    """Gradient of the objective w.r.t. the columns ``G_b`` of one block (float64).

    ``4[(WᵀW ∘ S) G_b − (W ⊛ AG)ᵀ X_b] + 4λ(S − sI) G_b``.
    """
    xp = get_namespace(G_b)
    W = xp.asarray(W, dtype=xp.float64)
    S = xp.asarray(S, dtype=xp.float64)
    G64 = xp.asarray(G_b, dtype=xp.float64)
    M = (W.T @ W) * S
    if ortho_strength > 0:
        M = M + ortho_strength * (S - ortho_scale * xp.eye(S.shape[0]))
    WAG = xp.repeat(W, n_classes, axis=0) * xp.asarray(AG, dtype=xp.float64)
    dt = G_b.dtype
    cross = xp.asarray((X_b.T @ xp.asarray(WAG, dtype=dt)).T, dtype=xp.float64)
    return 4.0 * (M @ G64 - cross)


def _update_w_mu(
    W: np.ndarray, AG: np.ndarray, S: np.ndarray, C: int, eps: float, mask: np.ndarray | None
) -> np.ndarray:
    N = lrm_n_matrix(AG, C)
    K = S * S
    Wn = W * (N / (W @ K + eps))
    if mask is not None:
        Wn[:, ~mask] = W[:, ~mask]
    return Wn


def _g_update_block(
    X_b: Any,
    pack_b: Any,
    W: Any,
    AG: Any,
    S: Any,
    *,
    C: int,
    lr: float,
    optimizer: str,
    adam_t: int,
    betas: tuple[float, float],
    adam_eps: float,
    ortho_strength: float,
    ortho_scale: float,
    mask: np.ndarray | None,
) -> Any:
    """New ``[G_b; m_b; v_b]`` (stacked along rows; only ``G_b`` for plain GD)."""
    xp = get_namespace(pack_b)
    r = S.shape[0]
    G_b = pack_b[:r]
    grad = lrm_block_grad(X_b, G_b, W, AG, S, C, ortho_strength, ortho_scale)
    if mask is not None:
        grad[xp.asarray(~mask)] = 0
    if optimizer == "gd":
        return xp.asarray(G_b - lr * grad, dtype=pack_b.dtype)
    b1, b2 = betas
    m = b1 * pack_b[r : 2 * r] + (1 - b1) * grad
    v = b2 * pack_b[2 * r :] + (1 - b2) * grad * grad
    mhat = m / (1 - b1**adam_t)
    vhat = v / (1 - b2**adam_t)
    step = lr * mhat / (xp.sqrt(vhat) + adam_eps)
    if mask is not None:
        step[xp.asarray(~mask)] = 0
    return xp.asarray(xp.concatenate([G_b - step, m, v], axis=0), dtype=pack_b.dtype)


# ---------------------------------------------------------------------------------------------
# In-memory solver
# ---------------------------------------------------------------------------------------------


def _blocks_of(X: Any) -> tuple[tuple[Any, ...], int | None, float | None]:
    if isinstance(X, LrmPefMatrix):
        return X.blocks, X.n_classes, X.tr_const
    return _nmf._as_blocks(X), None, None


def _resolve(X: Any, n_classes: int | None, tr_const: float | None):
    blocks, C, tr = _blocks_of(X)
    C = C if n_classes is None else int(n_classes)
    if C is None:
        raise UserInputError("n_classes is required unless X is an LrmPefMatrix")
    if blocks[0].shape[0] % C:
        raise UserInputError(f"X has {blocks[0].shape[0]} rows, not a multiple of C={C}")
    if tr_const is None:
        tr_const = tr
    if tr_const is None:
        tr_const = float(
            sum(
                lrm_trace_const(
                    sp.hstack(blocks) if sp.issparse(blocks[0]) else np.hstack(blocks), C
                )
            )
        )
    return blocks, C, float(tr_const)


def _pack(G: Any, m: Any, v: Any, optimizer: str) -> Any:
    if optimizer == "gd":
        return G
    xp = get_namespace(G)
    if m is None:
        m, v = xp.zeros_like(G), xp.zeros_like(G)
    return xp.concatenate([G, m, v], axis=0)


def lrm_init(
    X: Any,
    config: LrmConfig,
    *,
    n_classes: int | None = None,
    tr_const: float | None = None,
    W0: Any = None,
    G0: Any = None,
) -> LrmState:
    """Initial in-memory state (W ~ U[0,1), G ~ N(0, 2/(rP')), or ``(W0, G0)``).

    Args:
        X: an :class:`LrmPefMatrix`, a list of column blocks of ``X`` or one matrix (then
            ``n_classes`` is required; ``tr_const`` is computed if not given).
    """
    blocks, C, tr = _resolve(X, n_classes, tr_const)
    nC, p, r = blocks[0].shape[0], sum(b.shape[1] for b in blocks), config.n_components
    xp = get_namespace(blocks[0])
    dt = _nmf._work_dtype(blocks[0])
    if W0 is not None or G0 is not None:
        _check_wg(W0, G0, nC // C, p, r)
        W = np.array(to_numpy(W0), dtype=np.float64)
        G = xp.array(G0, dtype=dt, copy=True)
    else:
        W = _nmf.init_w(config.seed, nC // C, r)
        G = xp.asarray(init_g_columns(config.seed, r, p, 0, p, dt))
    AG, S = _nmf._stats_sum(blocks, [G[:, s:e] for s, e in _nmf._bounds_of(blocks)])
    obj, data = lrm_loss(tr, W, AG, S, C, config.ortho_strength, config.s)
    return LrmState(
        W=W, G=G, AG=AG, S=S, tr_const=tr, n_classes=C, losses=[obj], rel_losses=[_rel(tr, data)]
    )


def _check_wg(W0: Any, G0: Any, n: int, p: int, r: int) -> None:
    if W0 is None or G0 is None:
        raise UserInputError("give both W0 and G0 (custom init) or neither")
    if tuple(W0.shape) != (n, r) or tuple(G0.shape) != (r, p):
        raise UserInputError(
            f"W0 must be ({n}, {r}) and G0 ({r}, {p}); got {tuple(W0.shape)}, {tuple(G0.shape)}"
        )
    if np.any(to_numpy(W0) < 0):
        raise UserInputError("W0 must be non-negative")


def _phase(state: LrmState, config: LrmConfig) -> tuple[bool, float]:
    """``(update_w, learning rate)`` of the next step in the standard schedule."""
    if state.iteration < config.n_iters_g_only:
        lr = (
            config.learning_rate
            if config.learning_rate_g_only is None
            else (config.learning_rate_g_only)
        )
        return False, lr
    return True, config.learning_rate


def _advance(state, W, G, m, v, AG, S, config, update_w, seconds) -> LrmState:
    obj, data = lrm_loss(state.tr_const, W, AG, S, state.n_classes, config.ortho_strength, config.s)
    losses = [*state.losses, obj]
    converged = False
    if update_w and config.tol > 0 and len(losses) >= 2:
        prev = losses[-2]
        converged = abs(prev - obj) <= config.tol * abs(prev)
    _nmf.log.info("LRM-NPEFF step %d: loss %.6g (%.3f s)", state.iteration + 1, obj, seconds)
    return replace(
        state,
        W=W,
        G=G,
        AG=AG,
        S=S,
        iteration=state.iteration + 1,
        losses=losses,
        rel_losses=[*state.rel_losses, _rel(state.tr_const, data)],
        seconds=[*state.seconds, seconds],
        adam_m=m,
        adam_v=v,
        adam_t=state.adam_t + (1 if config.optimizer == "adam" else 0),
        converged=converged,
    )


def _task_kwargs(state: LrmState, config: LrmConfig, lr: float, mask) -> dict[str, Any]:
    # Plain GD steps on the mean over the n examples: G ← G − (lr / n) ∇_G (Adam's steps do not
    # depend on the gradient's scale).
    n = state.W.shape[0]
    return {
        "C": state.n_classes,
        "lr": lr / n if config.optimizer == "gd" else lr,
        "optimizer": config.optimizer,
        "adam_t": state.adam_t + 1,
        "betas": tuple(config.adam_betas),
        "adam_eps": config.adam_eps,
        "ortho_strength": config.ortho_strength,
        "ortho_scale": config.s,
        "mask": None if mask is None else np.asarray(mask, dtype=bool),
    }


def lrm_step(
    X: Any,
    state: LrmState,
    config: LrmConfig,
    *,
    update_w: bool | None = None,
    learning_rate: float | None = None,
    trainable: Any = None,
) -> LrmState:
    """One in-memory step: (W MU update,) G gradient step, new ``AG``/``S`` and loss.

    Args:
        X: as in :func:`lrm_init`.
        state: current state.
        config: settings.
        update_w: update W first (default: from the schedule, False in the G-only phase).
        learning_rate: G step (default: from the schedule).
        trainable: boolean ``(r,)``: only these components (rows of G, columns of W) move.
    """
    t0 = time.perf_counter()
    blocks, C, _ = _resolve(X, state.n_classes, state.tr_const)
    sched_w, sched_lr = _phase(state, config)
    update_w = sched_w if update_w is None else update_w
    lr = sched_lr if learning_rate is None else learning_rate
    mask = None if trainable is None else np.asarray(trainable, dtype=bool)
    W = _update_w_mu(state.W, state.AG, state.S, C, config.mu_eps, mask) if update_w else state.W
    kw = _task_kwargs(state, config, lr, mask)
    r = config.n_components
    pack = _pack(state.G, state.adam_m, state.adam_v, config.optimizer)
    xp = get_namespace(pack)
    new = xp.empty_like(pack)
    AG = S = None
    for X_b, (s, e) in zip(blocks, _nmf._bounds_of(blocks), strict=True):
        nb = _g_update_block(X_b, pack[:, s:e], W, state.AG, state.S, **kw)
        new[:, s:e] = nb
        a, h = lrm_block_stats(X_b, nb[:r])
        AG = a if AG is None else AG + a
        S = h if S is None else S + h
    G, m, v = (
        (new, None, None) if config.optimizer == "gd" else (new[:r], new[r : 2 * r], new[2 * r :])
    )
    return _advance(
        state, W, G, m, v, to_numpy(AG), to_numpy(S), config, update_w, time.perf_counter() - t0
    )


def fit_lrm(
    X: Any,
    config: LrmConfig,
    *,
    state: LrmState | None = None,
    n_classes: int | None = None,
    W0: Any = None,
    G0: Any = None,
    callback: Callable[[LrmState], bool | None] | None = None,
) -> LrmState:
    """In-memory LRM-NPEFF fit with the reference schedule (G-only, then joint).

    The phase of each step follows ``state.iteration``, so a resumed fit continues where it
    stopped. ``callback(state)`` returning ``True`` stops.
    """
    if state is None:
        state = lrm_init(X, config, n_classes=n_classes, W0=W0, G0=G0)
    total = config.n_iters_g_only + config.n_iters_joint
    while state.iteration < total and not state.converged:
        state = lrm_step(X, state, config)
        if callback is not None and callback(state):
            break
    return state


# ---------------------------------------------------------------------------------------------
# Expansion (add components to a trained G)
# ---------------------------------------------------------------------------------------------


def expand_lrm(
    X: Any,
    state: LrmState,
    n_new: int,
    *,
    seed: int,
    w_init: Literal["random", "zeros"] = "random",
) -> LrmState:
    """Append ``n_new`` random components to G (``N(0, 2/(r'P'))`` from stream 2 of ``seed``)
    and columns to W (``U[0,1)`` from ``default_rng([seed, 3])`` or zeros).

    The returned state has ``iteration = 0`` and no Adam moments; train it with
    :func:`fit_lrm_expansion` (or :func:`lrm_step` with ``trainable``). ``X`` may be in memory
    or a Dask array.
    """
    import dask.array as da

    if n_new < 1:
        raise UserInputError(f"n_new must be >= 1, got {n_new}")
    r_old = state.W.shape[1]
    r = r_old + n_new
    n, p = state.W.shape[0], state.G.shape[1]
    if w_init == "random":
        Wn = np.random.default_rng([seed, 3]).random((n, n_new))
    elif w_init == "zeros":
        Wn = np.zeros((n, n_new))
    else:
        raise UserInputError(f"w_init must be 'random' or 'zeros', got {w_init!r}")
    W = np.concatenate([state.W, Wn], axis=1)
    dt = state.G.dtype
    if isinstance(X, da.Array):
        X = _check_dask_X(X, state.n_classes)
        Gn = _init_g_graph(X, seed, n_new, r, p, stream=2)
        G = da.concatenate([_align_g(X, state.G, r_old), Gn], axis=0).astype(dt)
        G = G.rechunk(((r,), X.chunks[1]))
        packed = _stats_graph_lrm(X, G, r).compute()
        AG, S = _nmf._unpack_stats(packed, X.shape[0])
    else:
        blocks, _, _ = _resolve(X, state.n_classes, state.tr_const)
        xp = get_namespace(state.G)
        Gn = xp.asarray(init_g_columns(seed, n_new, p, 0, p, dt, stream=2) * math.sqrt(n_new / r))
        G = xp.concatenate([state.G, Gn], axis=0)
        AG, S = _nmf._stats_sum(blocks, [G[:, s:e] for s, e in _nmf._bounds_of(blocks)])
    obj, data = lrm_loss(state.tr_const, W, AG, S, state.n_classes)
    return LrmState(
        W=W,
        G=G,
        AG=AG,
        S=S,
        tr_const=state.tr_const,
        n_classes=state.n_classes,
        losses=[obj],
        rel_losses=[_rel(state.tr_const, data)],
    )


def fit_lrm_expansion(
    X: Any,
    state: LrmState,
    config: LrmConfig,
    n_old: int,
    *,
    n_iters_g_only: int,
    n_iters_joint_new_only: int,
    n_iters_joint: int,
    callback: Callable[[LrmState], bool | None] | None = None,
) -> LrmState:
    """Train an expanded state (:func:`expand_lrm`) in three stages, as
    ``run_m_npeff_expansion``: G-only on the new components, joint on the new components only,
    then joint on all. ``config.n_components`` must be the expanded ``r``; the stage follows
    ``state.iteration`` (resumable). Works for in-memory and Dask ``X``.
    """
    import dask.array as da

    r = state.W.shape[1]
    if config.n_components != r or not 0 <= n_old < r:
        raise UserInputError(f"config.n_components must be {r} and 0 <= n_old < {r}")
    new_only = np.arange(r) >= n_old
    stages = [
        (n_iters_g_only, False, new_only, config.learning_rate_g_only or config.learning_rate),
        (n_iters_joint_new_only, True, new_only, config.learning_rate),
        (n_iters_joint, True, None, config.learning_rate),
    ]
    step = lrm_step_dask if isinstance(X, da.Array) else lrm_step
    done = 0
    for n_it, upd_w, mask, lr in stages:
        done += n_it
        while state.iteration < done and not state.converged:
            state = step(X, state, config, update_w=upd_w, learning_rate=lr, trainable=mask)
            if callback is not None and callback(state):
                return state
    return state


# ---------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------


def _check_dask_X(X: Any, C: int) -> Any:
    import dask.array as da

    if not isinstance(X, da.Array) or X.ndim != 2:
        raise UserInputError(f"X must be a 2-D dask array, got {type(X).__name__}")
    if X.shape[0] % C:
        raise UserInputError(f"X has {X.shape[0]} rows, not a multiple of C={C}")
    if len(X.chunks[0]) != 1:
        X = X.rechunk({0: -1})
    return X


def _align_g(X: Any, G: Any, r: int) -> Any:
    return _nmf._align_H(X, G, r)


def _stats_graph_lrm(X: Any, G: Any, r: int) -> Any:
    return _nmf._stats_graph(X, G, r)


def _init_g_task(
    X_b: Any, seed: int, r: int, p: int, dtype: Any, stream: int, scale: float, block_info=None
) -> Any:
    start, stop = block_info[0]["array-location"][1]
    G = init_g_columns(seed, r, p, start, stop, np.float64, stream=stream) * scale
    return get_namespace(X_b).asarray(G.astype(dtype))


def _init_g_graph(X: Any, seed: int, r: int, r_total: int, p: int, stream: int = 1) -> Any:
    import dask.array as da

    dt = _nmf._h_dtype(X)
    return da.map_blocks(
        _init_g_task,
        X,
        seed,
        r,
        p,
        dt,
        stream,
        math.sqrt(r / r_total),
        chunks=((r,), X.chunks[1]),
        dtype=dt,
        meta=_nmf._meta_xp(X).empty((0, 0), dtype=dt),
        name=f"npeff-G-init-{seed}-{r}-{r_total}-{stream}-{X.name}",
    )


def lrm_init_dask(
    X: Any,
    config: LrmConfig,
    *,
    n_classes: int,
    tr_const: float | None = None,
    W0: Any = None,
    G0: Any = None,
) -> LrmState:
    """Initial state of a Dask fit; ``X`` (nC×P') is chunked by columns (rows whole).

    ``tr_const`` defaults to :func:`lrm_trace_const_dask` (one extra pass; small C only) —
    pass the value from preprocessing when available.
    """
    import dask

    C = int(n_classes)
    X = _check_dask_X(X, C)
    nC, p, r = X.shape[0], X.shape[1], config.n_components
    if W0 is not None or G0 is not None:
        _check_wg(W0, G0, nC // C, p, r)
        W = np.array(to_numpy(W0), dtype=np.float64)
        G = _align_g(X, G0, r).astype(_nmf._h_dtype(X))
    else:
        W = _nmf.init_w(config.seed, nC // C, r)
        G = _init_g_graph(X, config.seed, r, r, p)
    todo = [_stats_graph_lrm(X, G, r)]
    if tr_const is None:
        todo.append(lrm_trace_const_dask(X, C).sum())
    res = dask.compute(*todo)
    AG, S = _nmf._unpack_stats(res[0], nC)
    tr = float(tr_const) if tr_const is not None else float(res[1])
    obj, data = lrm_loss(tr, W, AG, S, C, config.ortho_strength, config.s)
    return LrmState(
        W=W, G=G, AG=AG, S=S, tr_const=tr, n_classes=C, losses=[obj], rel_losses=[_rel(tr, data)]
    )


def _g_task(X_b, pack_b, W, AG, S, **kw):
    return _g_update_block(X_b, pack_b, W, AG, S, **kw)


def lrm_step_dask(
    X: Any,
    state: LrmState,
    config: LrmConfig,
    *,
    update_w: bool | None = None,
    learning_rate: float | None = None,
    trainable: Any = None,
    g_target: Sequence[Any] | None = None,
    lock: bool = False,
) -> LrmState:
    """One Dask step (same maths and iterates as :func:`lrm_step`), one pass over X.

    Args:
        g_target: ``None`` to persist the new G (and Adam moments) in memory, or a sequence of
            array-likes to ``da.store`` them into: ``(G,)`` for GD, ``(G, adam_m, adam_v)``
            for Adam, each ``(r, P')``, not the storage the current arrays read from.
        Others: as :func:`lrm_step`.
    """
    import dask
    import dask.array as da

    t0 = time.perf_counter()
    C = state.n_classes
    X = _check_dask_X(X, C)
    nC, r = X.shape[0], config.n_components
    sched_w, sched_lr = _phase(state, config)
    update_w = sched_w if update_w is None else update_w
    lr = sched_lr if learning_rate is None else learning_rate
    mask = None if trainable is None else np.asarray(trainable, dtype=bool)
    W = _update_w_mu(state.W, state.AG, state.S, C, config.mu_eps, mask) if update_w else state.W
    kw = _task_kwargs(state, config, lr, mask)
    G = _align_g(X, state.G, r)
    k = 1
    parts = [G]
    if config.optimizer == "adam":
        k = 3
        if state.adam_m is None:
            parts += [da.zeros_like(G), da.zeros_like(G)]
        else:
            parts += [_align_g(X, state.adam_m, r), _align_g(X, state.adam_v, r)]
    pack = da.concatenate(parts, axis=0).rechunk(((k * r,), X.chunks[1])) if k > 1 else G
    dt = G.dtype
    tok = uuid.uuid4().hex
    Wd = da.from_array(W, chunks=W.shape, name=f"npeff-lrm-W-{tok}")
    AGd = da.from_array(state.AG, chunks=state.AG.shape, name=f"npeff-lrm-AG-{tok}")
    Sd = da.from_array(state.S, chunks=state.S.shape, name=f"npeff-lrm-S-{tok}")
    new = da.blockwise(
        functools.partial(_g_task, **kw),
        "zb",
        X,
        "ib",
        pack,
        "zb",
        Wd,
        "ek",
        AGd,
        "il",
        Sd,
        "mq",
        concatenate=True,
        dtype=dt,
        meta=_nmf._meta_xp(X).empty((0, 0), dtype=dt),
        name=f"npeff-lrm-G-{tok}",
    )
    outs = [new[:r]] if k == 1 else [new[:r], new[r : 2 * r], new[2 * r :]]
    stats = _stats_graph_lrm(X, outs[0], r)
    if g_target is None:
        persisted = dask.persist(*outs, stats)
        outs, packed = list(persisted[:-1]), persisted[-1].compute()
    else:
        if len(g_target) != len(outs):
            raise UserInputError(f"g_target needs {len(outs)} arrays, got {len(g_target)}")
        stored = da.store(outs, list(g_target), lock=lock, compute=False)
        _, packed = dask.compute(stored, stats)
        outs = [
            da.from_array(
                t,
                chunks=((r,), X.chunks[1]),
                name=f"npeff-lrm-G{i}-{uuid.uuid4().hex}",
                asarray=False,
            )
            for i, t in enumerate(g_target)
        ]
    AG, S = _nmf._unpack_stats(packed, nC)
    Gn, m, v = (outs[0], None, None) if k == 1 else tuple(outs)
    return _advance(state, W, Gn, m, v, AG, S, config, update_w, time.perf_counter() - t0)


def iter_lrm_dask(
    X: Any,
    config: LrmConfig,
    *,
    n_classes: int,
    state: LrmState | None = None,
    tr_const: float | None = None,
    g_target: Callable[[int], Sequence[Any]] | None = None,
    lock: bool = False,
) -> Iterator[LrmState]:
    """Yield the state after each Dask step of the reference schedule (resumable by
    ``state.iteration``). ``g_target(iteration)`` optionally gives the arrays to store into."""
    X = _check_dask_X(X, n_classes)
    if state is None:
        state = lrm_init_dask(X, config, n_classes=n_classes, tr_const=tr_const)
    total = config.n_iters_g_only + config.n_iters_joint
    while state.iteration < total and not state.converged:
        target = None if g_target is None else g_target(state.iteration + 1)
        state = lrm_step_dask(X, state, config, g_target=target, lock=lock)
        yield state


def fit_lrm_dask(
    X: Any,
    config: LrmConfig,
    *,
    n_classes: int,
    state: LrmState | None = None,
    tr_const: float | None = None,
    callback: Callable[[LrmState], bool | None] | None = None,
    g_target: Callable[[int], Sequence[Any]] | None = None,
) -> LrmState:
    """Dask LRM-NPEFF fit: :func:`iter_lrm_dask` to the end (``callback`` may stop it)."""
    X = _check_dask_X(X, n_classes)
    if state is None:
        state = lrm_init_dask(X, config, n_classes=n_classes, tr_const=tr_const)
    for st in iter_lrm_dask(X, config, n_classes=n_classes, state=state, g_target=g_target):
        state = st
        if callback is not None and callback(state):
            break
    return state


def lrm_state_from_checkpoint(X: Any, arrays: dict[str, Any], meta: dict[str, Any]) -> LrmState:
    """Rebuild a state saved with :meth:`LrmState.checkpoint` (``AG``/``S`` recomputed with
    one pass over X when missing). ``X`` is a Dask array or the in-memory blocks."""
    import dask.array as da

    W = np.asarray(to_numpy(arrays["W"]), dtype=np.float64)
    G = arrays["G"]
    r = W.shape[1]
    C = int(meta["n_classes"])
    AG, S = arrays.get("AG"), arrays.get("S")
    m, v = arrays.get("adam_m"), arrays.get("adam_v")
    if isinstance(X, da.Array):
        X = _check_dask_X(X, C)
        G = _align_g(X, G, r)
        if m is not None:
            m, v = _align_g(X, m, r), _align_g(X, v, r)
        if AG is None or S is None:
            AG, S = _nmf._unpack_stats(_stats_graph_lrm(X, G, r).compute(), X.shape[0])
    elif AG is None or S is None:
        blocks, _, _ = _resolve(X, C, meta["tr_const"])
        AG, S = _nmf._stats_sum(blocks, [G[:, s:e] for s, e in _nmf._bounds_of(blocks)])
    return LrmState(
        W=W,
        G=G,
        AG=np.asarray(to_numpy(AG), dtype=np.float64),
        S=np.asarray(to_numpy(S), dtype=np.float64),
        tr_const=float(meta["tr_const"]),
        n_classes=C,
        iteration=int(meta.get("iteration", 0)),
        losses=[float(x) for x in meta.get("losses", [])],
        rel_losses=[float(x) for x in meta.get("rel_losses", [])],
        seconds=[float(x) for x in meta.get("seconds", [])],
        adam_m=m,
        adam_v=v,
        adam_t=int(meta.get("adam_t", 0)),
        converged=bool(meta.get("converged", False)),
    )


# ---------------------------------------------------------------------------------------------
# Coefficients with G fixed
# ---------------------------------------------------------------------------------------------


def fit_lrm_coeffs(
    X: Any,
    G: Any,
    *,
    n_classes: int | None = None,
    method: Method = "hals",
    max_iter: int = 1000,
    tol: float = 1e-10,
) -> np.ndarray:
    """Coefficients ``W`` (n×r) of in-memory LRM-PEFs for a fixed ``G`` (exact NNLS per
    example with Gram ``K = (GGᵀ)∘(GGᵀ)`` and linear term ``N``; see :mod:`.coeffs`)."""
    blocks, C, _ = _resolve(X, n_classes, 0.0)
    AG, S = _nmf._stats_sum(blocks, [G[:, s:e] for s, e in _nmf._bounds_of(blocks)])
    return to_numpy(
        nnls_gram(S * S, lrm_n_matrix(AG, C), method=method, max_iter=max_iter, tol=tol)
    )


def _lrm_coeff_task(AG: Any, K: np.ndarray, C: int, method: str, max_iter: int, tol: float):
    return nnls_gram(K, lrm_n_matrix(AG, C), method=method, max_iter=max_iter, tol=tol)


def fit_lrm_coeffs_dask(
    X: Any,
    G: Any,
    *,
    n_classes: int,
    method: Method = "hals",
    max_iter: int = 1000,
    tol: float = 1e-10,
) -> Any:
    """Lazy coefficients (n×r Dask array) of a Dask ``X`` (nC×P'), streamed over example
    chunks (row chunks must be multiples of C) and reduced over column blocks."""
    import dask.array as da

    from curvlake.pipelines.npeff.coeffs import gram

    C = int(n_classes)
    if not isinstance(X, da.Array) or X.ndim != 2:
        raise UserInputError(f"X must be a 2-D dask array, got {type(X).__name__}")
    if any(c % C for c in X.chunks[0]):
        raise UserInputError(f"row chunks of X must be multiples of C={C}: {X.chunks[0]}")
    S = gram(G)
    AG = coeffs_dask(X, G)
    r = S.shape[0]
    return AG.map_blocks(
        _lrm_coeff_task,
        S * S,
        C,
        method,
        max_iter,
        tol,
        chunks=(tuple(c // C for c in X.chunks[0]), (r,)),
        dtype=np.float64,
        meta=AG._meta,
    )
