"""Per-example Fisher (PEF) kernels for NPEFF, in pure torch.

NPEFF (Matena & Raffel, "NPEFF: Non-Negative Per-Example Fisher Factorization",
arXiv 2310.04649) decomposes the Fisher information matrix of a classifier at single examples.
For an example ``x`` with softmax output ``p = softmax(z(x; θ))`` over ``C`` classes, the
per-example Fisher is

    F(x) = Σ_c p_c g_c g_cᵀ,    g_c = ∇_θ log p_c(x; θ) ∈ R^P,

the expectation of the outer product of the score over the model's own predictive distribution
(the label is never used). Writing ``a_c = √p_c g_c`` gives the exact low-rank factorisation
``F(x) = Σ_c a_c a_cᵀ = Aᵀ A`` with ``A ∈ R^{C×P}`` (one row per class), and because
``Σ_c √p_c a_c = Σ_c p_c ∇ log p_c = ∇ Σ_c p_c = 0`` the rank is at most ``C − 1``.

Every kernel here is a choice of cotangents at the logits for the shared per-example engine
:func:`curvlake.autodiff.per_example_grads`: a class selection ``(c_k, w_k)`` per example gives
the rows ``w_k ∇_θ log p_{c_k} = Jᵀ w_k (e_{c_k} − p)`` (``J`` the logits' parameter Jacobian),
and the D-PEF is the engine's ``sqsum`` mode on them. Conventions (from the engine):

* θ is the flat parameter vector of :mod:`curvlake.nn.params`, every tensor of
  ``model.named_parameters()`` (frozen ones included), flattened row-major in that order (see
  :func:`layer_table`); this is the column index space ``[0, P)`` of every PEF.
* The model is evaluated in eval mode (its train/eval flags are restored afterwards) on copies
  of its tensors in ``dtype`` / ``device``; the model itself is never modified.
* Results never mix examples: the output for a batch equals the stacked outputs for its
  examples (``batch_size`` only trades memory for speed).
* ``backend``: ``"func"`` (``torch.func``), ``"layerwise"`` (closed forms for Linear, Conv,
  BatchNorm, LayerNorm and Embedding layers; for a Linear layer the D-PEF needs no per-class
  gradient: ``Σ_k (δ_k ⊗ h)² = (Σ_k δ_k²) ⊗ h²``, the BackPACK ``BatchDiagGGNExact`` recipe,
  Dangel et al., ICLR 2020) or ``"auto"`` (layerwise when it applies, else func). Both give the
  same numbers up to float rounding; see :mod:`curvlake.autodiff.per_example`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvlake.autodiff import Backend, CotangentFn, per_example_grads, predict_logits
from curvlake.autodiff._model import (
    batches,
    check_batch_size,
    check_dtype_device,
    resolve_batch_size,
)
from curvlake.errors import UserInputError
from curvlake.nn.params import flat_tensor, parameter_table

__all__ = [
    "Backend",
    "ParamInfo",
    "dataset_fisher_diag",
    "dataset_fisher_diag_sum",
    "dense_diag",
    "dense_lowrank",
    "filter_examples",
    "flat_params",
    "layer_table",
    "lowrank_class_offsets",
    "lowrank_frobenius_norm",
    "per_example_fisher_diag",
    "per_example_fisher_lowrank",
    "per_example_fisher_lvrm",
    "per_example_logprob_grads",
    "predict_logits",
    "top_classes",
    "topk_sparsify_diag",
    "topk_sparsify_lowrank",
]


# ---------------------------------------------------------------------------------------------
# The parameter space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor's slot in the flat parameter vector θ.

    Attributes:
        name: Name from ``model.named_parameters()``.
        offset: First index of the tensor in θ.
        size: Number of entries (``prod(shape)``).
        shape: Shape of the tensor; it occupies ``θ[offset:offset + size]`` flattened row-major.
    """

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]


def layer_table(model: nn.Module) -> list[ParamInfo]:
    """Layout of θ: one :class:`ParamInfo` per tensor of ``named_parameters()``, in order.

    The same space as :func:`curvlake.nn.params.parameter_table`: frozen parameters
    (``requires_grad=False``) are columns like any other (their gradient is still well defined);
    tied parameters appear once.

    Args:
        model: Any ``nn.Module``.

    Returns:
        The table; ``table[-1].offset + table[-1].size == P``.
    """
    return [
        ParamInfo(name, where.start, where.stop - where.start, shape)
        for name, where, shape in parameter_table(model).slices()
    ]


def flat_params(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flat parameter vector θ ∈ R^P in :func:`layer_table` order (a detached copy).

    Args:
        model: Any ``nn.Module``.
        dtype: Floating dtype of the result.
        device: Device of the result (default: the model's).

    Returns:
        1-D tensor of length P.
    """
    dtype, device = check_dtype_device(model, dtype, device)
    return flat_tensor(model, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Class selections -> cotangents at the logits
# ---------------------------------------------------------------------------------------------

# A class selection maps the log-probabilities of a batch (b, C) and the slice of x it covers
# to (classes (b, K) int64, weights (b, K)), i.e. the rows w_ik ∇ log p_{c_ik}(x_i). Every PEF
# variant is such a selection.
Selection = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


def _square_root_rows(g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rows ``s_r`` with ``Σ_r s_r s_rᵀ = Σ_k g_k g_kᵀ`` per example; C − 1 of them for C classes.

    The diagonal Fisher only depends on the logit-space matrix ``M = Σ_k g_k g_kᵀ = Gᵀ G``:
    ``Σ_k (Jᵀ g_k)² = diag(Jᵀ M J) = Σ_r (Jᵀ s_r)²`` for any rows with ``Sᵀ S = M``, e.g.
    ``S = U G`` with ``U`` orthogonal. When every example keeps all C classes, the rows
    ``g_k = w_k (e_{c_k} − p)`` with ``w_k = √p_{c_k}`` are linearly dependent:
    ``Σ_k w_k g_k = p − p Σ_c p_c = 0``. The Householder reflection ``U`` that maps
    ``w / ||w||`` to ``−e_C`` therefore zeroes the last row of ``U G`` (up to rounding), which is
    dropped: one backward pass saved in C, nothing truncated. Otherwise (some weight is zero,
    e.g. with ``min_prob``) the rows are returned as they are.

    Args:
        g: ``(n, K, C)`` cotangents at the logits.
        weights: ``(n, K)`` the ``w_k`` of those rows.

    Returns:
        ``(n, C − 1, C)`` or ``g`` itself, in ``g``'s dtype.
    """
    _, K, C = g.shape
    if K != C or K < 2 or not bool((weights > 0).all()):
        return g
    # Elementwise products and sums only (no bmm): the same rounding whatever the batch size.
    g64, w = g.to(torch.float64), weights.to(torch.float64)
    v = w / w.norm(dim=1, keepdim=True)
    v[:, -1] += 1.0  # v = ŵ + e_C (ŵ ≥ 0, so no cancellation); U = I − 2 v vᵀ / vᵀv
    vg = (v.unsqueeze(-1) * g64).sum(1, keepdim=True)  # (n, 1, C)
    reflected = g64 - (2 / (v * v).sum(1))[:, None, None] * v.unsqueeze(-1) * vg
    return reflected[:, :-1].to(g.dtype)


def _score_cotangents(select: Selection, *, square_root: bool = False) -> CotangentFn:
    """Cotangents ``w_k (e_{c_k} − p)`` at the logits of the rows ``w_k ∇_θ log p_{c_k}``.

    ``∂/∂z Σ_k w_k log p_{c_k} = Σ_k w_k (e_{c_k} − p)``: the log-softmax is differentiated in
    closed form. With ``square_root`` (sums of squares only) the rows are replaced by
    :func:`_square_root_rows`. The aux of each batch is its ``(classes, weights)``.
    """

    def cotangents(logits: torch.Tensor, rows: slice):
        log_probs = torch.log_softmax(logits, dim=-1)
        classes, weights = select(log_probs, rows)
        onehot = F.one_hot(classes.clamp_min(0), logits.shape[1]).to(log_probs.dtype)
        cot = weights.unsqueeze(-1) * (onehot - log_probs.exp().unsqueeze(1))
        if square_root:
            cot = _square_root_rows(cot, weights)
        return cot, (classes, weights)

    return cotangents


def _score_grads(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    select: Selection,
    *,
    sqsum: bool,
    dtype: torch.dtype,
    device: torch.device | str | None,
    batch_size: int | None,
    backend: str,
    class_chunk: int | None = None,
    n_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of ``select`` (or their sums of squares) through the per-example engine.

    Returns:
        ``(grads, classes, weights)``: ``grads`` is ``(n, P)`` (``sqsum``) or ``(n, R, P)``
        with ``R = n_rows`` or the selection's width; ``classes`` / ``weights`` are ``(n, R)``,
        padded with class −1 and weight 0 (and zero gradient rows).
    """
    if class_chunk is not None and (not isinstance(class_chunk, int) or class_chunk < 1):
        raise UserInputError(f"class_chunk={class_chunk!r} must be a positive int or None")
    grads, auxes = per_example_grads(
        model,
        x,
        _score_cotangents(select, square_root=sqsum),
        sqsum=sqsum,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
        n_rows=n_rows,
        row_chunk=class_chunk,
        return_aux=True,
    )
    width = max([c.shape[1] for c, _ in auxes] + [n_rows or 0])
    classes = torch.cat([F.pad(c, (0, width - c.shape[1]), value=-1) for c, _ in auxes])
    weights = torch.cat([F.pad(w, (0, width - w.shape[1])) for _, w in auxes])
    return grads, classes, weights


def top_classes(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Indices of the ``k`` largest logits per example, largest first (ties: lower index first).

    Args:
        logits: ``(n, C)`` logits (or log-probabilities: the order is the same).
        k: Number of classes to keep, ``1 <= k <= C``; ``None`` keeps all classes in index order.

    Returns:
        ``(n, k)`` int64 class indices.
    """
    n, C = logits.shape
    if k is None:
        return torch.arange(C, device=logits.device).expand(n, C)
    return torch.argsort(logits, dim=-1, descending=True, stable=True)[:, :k]


def _check_prob(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise UserInputError(f"{name}={value!r} must be a probability in [0, 1] or None")


def _check_k(name: str, value: int | None, upper: int | None = None) -> None:
    if value is None:
        return
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"{name}={value!r} must be a positive int")
    if upper is not None and value > upper:
        raise UserInputError(f"{name}={value} must be at most {upper}")


def _probable_classes(max_classes: int | None, min_prob: float | None) -> Selection:
    """Classes by descending p, cut to ``max_classes``, weight √p_c, zero weight if p_c < τ.

    The width is the largest per-example count in the batch so no work is spent on classes no
    example keeps; slots beyond an example's own count get weight 0 (and class −1 is reported
    by the callers that care).
    """

    def select(log_probs: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        C = log_probs.shape[1]
        if max_classes is not None and max_classes > C:
            raise UserInputError(f"max_classes={max_classes} exceeds the model's C={C} classes")
        order = torch.argsort(log_probs, dim=-1, descending=True, stable=True)
        p = log_probs.exp().gather(1, order)
        keep = torch.ones_like(p, dtype=torch.bool)
        if max_classes is not None:
            keep[:, max_classes:] = False
        if min_prob is not None:
            keep &= p >= min_prob
        width = max(1, int(keep.sum(1).max()))
        order, p, keep = order[:, :width], p[:, :width], keep[:, :width]
        return order, torch.where(keep, p.sqrt(), torch.zeros_like(p))

    return select


def _all_classes(top_k: int | None) -> Selection:
    def select(log_probs: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        _check_k("top_k_classes", top_k, log_probs.shape[1])
        classes = top_classes(log_probs, top_k)
        return classes, log_probs.gather(1, classes).exp().sqrt()

    return select


# ---------------------------------------------------------------------------------------------
# Public PEF kernels
# ---------------------------------------------------------------------------------------------


def per_example_logprob_grads(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    classes: torch.Tensor | np.ndarray | None = None,
    *,
    weights: torch.Tensor | np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-example, per-class log-softmax gradients ``G[i, k] = w_ik ∇_θ log p_{c_ik}(x_i)``.

    The engine's gradients :func:`curvlake.autodiff.per_example_grads` for the cotangents
    ``w_ik (e_{c_ik} − p_i)`` at the logits.

    Args:
        model: Classifier mapping a batch ``(n, ...)`` to logits ``(n, C)``.
        x: Inputs ``(n, ...)``.
        classes: ``(n, K)`` class indices per example; ``None`` means all classes ``0..C-1``.
        weights: ``(n, K)`` factors ``w_ik``; ``None`` means 1.
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (memory ``~ batch_size · K · P``; default:
            a ~256 MiB ``(batch, P)`` block, at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.

    Returns:
        ``(n, K, P)`` tensor; columns in :func:`layer_table` order.
    """
    n = len(x)
    cls = None if classes is None else torch.as_tensor(classes, dtype=torch.int64)
    if cls is not None and (cls.ndim != 2 or cls.shape[0] != n):
        raise UserInputError(f"classes must have shape (n={n}, K), got {tuple(cls.shape)}")
    w = None if weights is None else torch.as_tensor(weights)
    if w is not None and cls is not None and w.shape != cls.shape:
        raise UserInputError(f"weights shape {tuple(w.shape)} must equal classes shape")

    def select(log_probs: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        b, C = log_probs.shape
        c = torch.arange(C).expand(b, C) if cls is None else cls[rows]
        if (c < 0).any() or (c >= C).any():
            raise UserInputError(f"classes must lie in [0, {C})")
        ww = torch.ones(c.shape, dtype=log_probs.dtype) if w is None else w[rows]
        return c.to(log_probs.device), ww.to(device=log_probs.device, dtype=log_probs.dtype)

    grads, *_ = _score_grads(
        model,
        x,
        select,
        sqsum=False,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
    )
    return grads


def per_example_fisher_diag(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    min_prob: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
    class_chunk: int | None = None,
) -> torch.Tensor:
    """Diagonal per-example Fishers (D-PEFs).

    ``f(x) = diag F(x) = Σ_c p_c (∇_θ log p_c)² = Σ_c a_c²`` (elementwise squares), an exact
    expectation over the model's predictive distribution (no label, no sampling). With
    ``min_prob = τ`` only classes with ``p_c ≥ τ`` contribute and the sum is *not* renormalised
    (NPEFF's ``TopClassesSparseDPefComputer``). This equals BackPACK's per-sample exact diagonal
    GGN of the summed cross-entropy, since the GGN of softmax cross-entropy is the Fisher.

    The ``(n, C, P)`` per-class gradients are never held at once. The layerwise back-end runs
    one backward per class and adds each layer's squared per-example gradient into the
    ``(n, P)`` result (for a Linear layer it only accumulates ``Σ_c δ_c²`` and forms
    ``(Σ_c δ_c²) ⊗ h²`` once); the ``torch.func`` back-end takes classes ``class_chunk`` at a
    time. Classes that no example of a batch keeps (``min_prob``) cost nothing.

    Args:
        model: Classifier mapping ``(n, ...)`` to logits ``(n, C)``.
        x: Inputs ``(n, ...)``.
        min_prob: Drop classes with ``p_c < min_prob`` (per example); ``None`` keeps all.
        dtype: Compute and output dtype (float32 default, float64 for exact checks).
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (default: a ~256 MiB ``(batch, P)`` block,
            at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.
        class_chunk: Classes per vectorised step of the ``"func"`` back-end (default: as many
            as fit a ~256 MiB ``(batch, chunk, P)`` block).

    Returns:
        ``(n, P)`` non-negative tensor.
    """
    _check_prob("min_prob", min_prob)
    f, *_ = _score_grads(
        model,
        x,
        _probable_classes(None, min_prob),
        sqsum=True,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
        class_chunk=class_chunk,
    )
    return f


def per_example_fisher_lowrank(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    top_k_classes: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Low-rank per-example Fisher factors (LRM-PEFs).

    ``F(x) = Aᵀ A`` with rows ``a_c = √p_c ∇_θ log p_c``. Over all classes,
    ``Σ_c √p_c a_c = ∇_θ Σ_c p_c = 0`` so ``rank(A) ≤ C − 1``.

    Args:
        model: Classifier mapping ``(n, ...)`` to logits ``(n, C)``.
        x: Inputs ``(n, ...)``.
        top_k_classes: Keep only the ``k`` classes with the largest logits, rows ordered by
            descending logit (ties: lower class first; recover the class ids with
            :func:`top_classes` on the logits). ``None`` keeps all ``C`` rows in class order.
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (memory ``~ batch_size · C' · P``; default:
            a ~256 MiB ``(batch, P)`` block, at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.

    Returns:
        ``A``, an ``(n, C', P)`` tensor, ``C' = top_k_classes or C``.
    """
    _check_k("top_k_classes", top_k_classes)
    a, *_ = _score_grads(
        model,
        x,
        _all_classes(top_k_classes),
        sqsum=False,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
    )
    return a


def per_example_fisher_lvrm(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    max_classes: int,
    min_prob: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Variable-rank per-example Fisher factors (LVRM-PEFs).

    Per example the classes are sorted by ``p`` descending, cut to the first ``max_classes``
    and filtered to ``p_c ≥ min_prob``; the ``r_i`` survivors give rows ``a_c = √p_c ∇ log p_c``
    (NPEFF's LVRM-PEF, there computed one example at a time). ``r_i`` may be 0 when
    ``min_prob > max_c p_c``.

    Args:
        model: Classifier mapping ``(n, ...)`` to logits ``(n, C)``.
        x: Inputs ``(n, ...)``.
        max_classes: Largest rank, ``1 <= max_classes <= C``.
        min_prob: Probability threshold τ in ``[0, 1]``.
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (default: a ~256 MiB ``(batch, P)`` block,
            at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.

    Returns:
        ``(A, ranks, classes)``: ``A`` of shape ``(n, max_classes, P)`` whose rows ``≥ r_i`` are
        zero, ``ranks`` int64 ``(n,)``, and ``classes`` int64 ``(n, max_classes)`` with the
        class of each row (``-1`` beyond the rank).
    """
    _check_k("max_classes", max_classes)
    _check_prob("min_prob", min_prob)
    if min_prob is None:
        raise UserInputError("min_prob must be given for LVRM-PEFs (use 0.0 to keep all)")
    a, classes, weights = _score_grads(
        model,
        x,
        _probable_classes(max_classes, min_prob),
        sqsum=False,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
        n_rows=max_classes,
    )
    kept = weights > 0
    # A class with p_c ≥ τ but p_c == 0 in floating point cannot occur unless τ == 0; keep the
    # rank definition exact for τ == 0 by counting by position instead of by weight.
    if min_prob == 0:
        kept = classes >= 0
    ranks = kept.sum(1)
    a = a * kept.unsqueeze(-1).to(a.dtype)
    classes = torch.where(kept, classes, torch.full_like(classes, -1))
    return a, ranks, classes


# ---------------------------------------------------------------------------------------------
# Sparsification and norms
# ---------------------------------------------------------------------------------------------


def _index_dtype(size: int) -> torch.dtype:
    return torch.int32 if size < 2**31 else torch.int64


def topk_sparsify_diag(
    f: torch.Tensor, k: int, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest entries of each D-PEF, plus the dense L2 norm.

    D-PEFs are non-negative, so largest value = largest magnitude. Unlike the reference (which
    stores ``top_k`` output in descending-value order), entries are stored **sorted by
    parameter index ascending**: each row is then a canonical CSR row (sorted column indices,
    what scipy/cuSPARSE expect for ``has_sorted_indices`` and fast merges), the column-block
    re-layout for NPEFF becomes a ``searchsorted`` per row instead of a scan, the index stream
    delta-compresses well in Zarr, and the stored bytes do not depend on the tie order of
    ``topk``. Which of several *equal* values is kept at the cut is unspecified.

    Args:
        f: ``(n, P)`` D-PEFs.
        k: Entries kept per example, ``1 <= k <= P``.
        dtype: dtype of values and norms (float32 for storage).

    Returns:
        ``(values (n, k), indices (n, k), dense_norm (n,))``; ``indices`` are int32 when
        ``P < 2³¹`` else int64; ``dense_norm = ‖f‖₂`` of the full dense row (computed in
        float64), which NPEFF uses to normalise rows to unit norm.
    """
    f = torch.as_tensor(f)
    if f.ndim != 2:
        raise UserInputError(f"f must be (n, P), got shape {tuple(f.shape)}")
    _check_k("k", k, f.shape[1])
    idx = torch.topk(f, k, dim=1, sorted=False).indices
    idx = torch.sort(idx, dim=1).values
    values = f.gather(1, idx).to(dtype)
    norms = torch.linalg.vector_norm(f.to(torch.float64), dim=1).to(dtype)
    return values, idx.to(_index_dtype(f.shape[1])), norms


def lowrank_frobenius_norm(a: torch.Tensor) -> torch.Tensor:
    """``‖F‖_F = ‖Aᵀ A‖_F = ‖A Aᵀ‖_F`` per example, via the ``C × C`` Gram (never ``P × P``).

    ``‖AᵀA‖²_F = tr(AᵀA AᵀA) = tr(AAᵀ AAᵀ) = ‖AAᵀ‖²_F``. Computed in float64.

    Args:
        a: ``(n, C, P)`` factors.

    Returns:
        ``(n,)`` float64 norms.
    """
    a = torch.as_tensor(a).to(torch.float64)
    if a.ndim != 3:
        raise UserInputError(f"A must be (n, C, P), got shape {tuple(a.shape)}")
    gram = a @ a.transpose(1, 2)
    return torch.linalg.matrix_norm(gram, ord="fro")


def topk_sparsify_lowrank(
    a: torch.Tensor, k: int, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest-magnitude entries of each example's ``C × P`` factor matrix.

    Classes compete for the budget (top-k over the flattened ``C·P`` entries, as in NPEFF).
    Entries are sorted by ``(class, parameter)``, i.e. by flat index ``c·P + j``, which makes
    each example a per-class CSC block (column = class, see :func:`lowrank_class_offsets`).
    Values keep their sign.

    Args:
        a: ``(n, C, P)`` LRM-PEF factors (zero rows of LVRM padding are never preferred over
            non-zeros).
        k: Entries kept per example, ``1 <= k <= C·P``.
        dtype: dtype of values and norms.

    Returns:
        ``(values (n, k), class_indices (n, k), param_indices (n, k), frobenius_norm (n,))``
        with int32 indices when ``C·P < 2³¹`` (int64 otherwise) and ``‖AᵀA‖_F`` of the dense
        factors from :func:`lowrank_frobenius_norm`.
    """
    a = torch.as_tensor(a)
    if a.ndim != 3:
        raise UserInputError(f"A must be (n, C, P), got shape {tuple(a.shape)}")
    n, C, P = a.shape
    _check_k("k", k, C * P)
    flat = a.reshape(n, C * P)
    idx = torch.topk(flat.abs(), k, dim=1, sorted=False).indices
    idx = torch.sort(idx, dim=1).values
    values = flat.gather(1, idx).to(dtype)
    itype = _index_dtype(C * P)
    return (
        values,
        torch.div(idx, P, rounding_mode="floor").to(itype),
        (idx % P).to(itype),
        lowrank_frobenius_norm(a).to(dtype),
    )


def lowrank_class_offsets(class_indices: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Cumulative per-class entry counts ``(n, C + 1)`` (NPEFF's ``col_offsets``).

    Args:
        class_indices: ``(n, k)`` class of each kept entry, sorted ascending per row (as
            returned by :func:`topk_sparsify_lowrank`).
        n_classes: ``C``.

    Returns:
        ``(n, C + 1)`` int64; entries of class ``c`` occupy ``[off[c], off[c + 1])``.
    """
    ci = torch.as_tensor(class_indices).to(torch.int64)
    counts = torch.zeros((ci.shape[0], n_classes), dtype=torch.int64, device=ci.device)
    counts.scatter_add_(1, ci, torch.ones_like(ci))
    return F.pad(counts.cumsum(1), (1, 0))


def dense_diag(
    f: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense storage path for small models: the D-PEFs themselves and their L2 norms.

    Returns:
        ``(values (n, P), dense_norm (n,))`` in ``dtype`` (norms computed in float64).
    """
    f = torch.as_tensor(f)
    if f.ndim != 2:
        raise UserInputError(f"f must be (n, P), got shape {tuple(f.shape)}")
    return f.to(dtype), torch.linalg.vector_norm(f.to(torch.float64), dim=1).to(dtype)


def dense_lowrank(
    a: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense storage path for small models: the factors ``A`` and ``‖AᵀA‖_F``.

    Returns:
        ``(A (n, C, P), frobenius_norm (n,))`` in ``dtype``.
    """
    a = torch.as_tensor(a)
    return a.to(dtype), lowrank_frobenius_norm(a).to(dtype)


# ---------------------------------------------------------------------------------------------
# Dataset-level diagonal Fisher
# ---------------------------------------------------------------------------------------------


def _example_uniforms(seed: int, start: int, stop: int) -> np.ndarray:
    """One U[0, 1) draw per global example index, counter-based: ``default_rng([seed, i])``.

    Keyed per example (rather than per block) so the samples — hence the DSF — do not depend on
    how examples are split into blocks, workers or batches.
    """
    return np.array([np.random.default_rng([seed, i]).random() for i in range(start, stop)])


def dataset_fisher_diag_sum(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    mode: Literal["expectation", "sampling"] = "expectation",
    seed: int = 0,
    example_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, int]:
    """Block partial sum of the dataset-level diagonal Fisher (DSF), for a Dask tree-reduction.

    * ``"expectation"``: ``Σ_i f(x_i) = Σ_i Σ_c p_c(x_i) (∇ log p_c(x_i))²`` (sum of D-PEFs).
    * ``"sampling"``: ``Σ_i (∇ log p_{y_i}(x_i))²`` with ``y_i ~ p(· | x_i)`` drawn by inverse CDF
      from ``u_i = default_rng([seed, example_offset + i]).random()``: an unbiased one-sample
      estimate of each D-PEF, reproducible whatever the blocking.

    Combine blocks by adding sums and counts; the DSF is ``Σ sums / Σ counts``.

    Args:
        model: Classifier mapping ``(n, ...)`` to logits ``(n, C)``.
        x: The block's inputs ``(n, ...)``.
        mode: ``"expectation"`` or ``"sampling"``.
        seed: Sampling seed (unused for ``"expectation"``).
        example_offset: Global index of ``x[0]`` in the dataset (the sampling counter).
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (default: a ~256 MiB ``(batch, P)`` block,
            at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.

    Returns:
        ``(sum (P,), count)``.
    """
    if mode not in ("expectation", "sampling"):
        raise UserInputError(f"mode={mode!r} must be 'expectation' or 'sampling'")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise UserInputError(f"seed={seed!r} must be a non-negative int")
    if not isinstance(example_offset, int | np.integer) or example_offset < 0:
        raise UserInputError(f"example_offset={example_offset!r} must be a non-negative int")
    dtype, _ = check_dtype_device(model, dtype, device)
    check_batch_size(batch_size)
    n = len(x)
    batch_size = resolve_batch_size(batch_size, parameter_table(model).total, dtype)
    if mode == "sampling":
        u = _example_uniforms(int(seed), int(example_offset), int(example_offset) + n)
    total = None
    # One batch at a time so that only a (batch, P) block of squared gradients is alive.
    for sl in batches(n, batch_size):
        if mode == "expectation":
            select = _probable_classes(None, None)
        else:
            select = _sampled_class(u[sl])
        f, *_ = _score_grads(
            model,
            x[sl],
            select,
            sqsum=True,
            dtype=dtype,
            device=device,
            batch_size=sl.stop - sl.start,
            backend=backend,
        )
        total = f.sum(0) if total is None else total + f.sum(0)
    return total, n


def _sampled_class(u: np.ndarray) -> Selection:
    """``y_i ~ p(· | x_i)`` by inverse CDF from the uniforms ``u_i``, weight 1."""

    def select(log_probs: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        b = log_probs.shape[0]
        cdf = np.cumsum(log_probs.detach().to("cpu", torch.float64).exp().numpy(), axis=1)
        y = np.minimum((cdf < (u[rows] * cdf[:, -1])[:, None]).sum(axis=1), cdf.shape[1] - 1)
        classes = torch.as_tensor(y, device=log_probs.device).reshape(b, 1)
        return classes, torch.ones(b, 1, dtype=log_probs.dtype, device=log_probs.device)

    return select


def dataset_fisher_diag(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    mode: Literal["expectation", "sampling"] = "expectation",
    seed: int = 0,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dataset-level diagonal Fisher ``(1/n) Σ_i`` of D-PEFs or of sampled squared scores.

    Serial reference for the Dask reduction: blocks of ``block_size`` examples go through
    :func:`dataset_fisher_diag_sum` and are summed. The result does not depend on
    ``block_size`` or ``batch_size`` (up to float rounding). NPEFF normalises it to unit L2
    norm before use in D-NPEFF perturbations; that is left to the caller.

    Args:
        model: Classifier mapping ``(n, ...)`` to logits ``(n, C)``.
        x: Inputs ``(n, ...)``.
        mode: ``"expectation"`` (mean of D-PEFs) or ``"sampling"`` (``y ~ p``).
        seed: Sampling seed.
        block_size: Examples per block (default: all in one block).
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (default: a ~256 MiB ``(batch, P)`` block,
            at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.

    Returns:
        ``(P,)`` tensor.
    """
    n = len(x)
    if n == 0:
        raise UserInputError("x must contain at least one example")
    _check_k("block_size", block_size)
    block_size = block_size or n
    total, count = None, 0
    for sl in batches(n, block_size):
        s, c = dataset_fisher_diag_sum(
            model,
            x[sl],
            mode=mode,
            seed=seed,
            example_offset=sl.start,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            backend=backend,
        )
        total = s if total is None else total + s
        count += c
    return total / count


# ---------------------------------------------------------------------------------------------
# Example filters
# ---------------------------------------------------------------------------------------------


def filter_examples(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    incorrect_only: bool = False,
    labels_in: Sequence[int] | np.ndarray | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the examples passing all the given filters (conditions are ANDed).

    Args:
        logits: ``(n, C)`` model logits.
        labels: ``(n,)`` integer labels.
        incorrect_only: Keep examples with ``argmax logits ≠ label`` (NPEFF ``INCORRECTS_ONLY``).
        labels_in: Keep examples whose label is in this set.
        indices: Keep only these example indices (each in ``[0, n)``).

    Returns:
        Sorted, unique int64 indices into ``[0, n)``.
    """
    logits = np.asarray(logits.detach().cpu() if torch.is_tensor(logits) else logits)
    labels = np.asarray(labels.detach().cpu() if torch.is_tensor(labels) else labels)
    if logits.ndim != 2:
        raise UserInputError(f"logits must be (n, C), got shape {logits.shape}")
    n = logits.shape[0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"labels must be integers of shape ({n},), got {labels.shape}")
    keep = np.ones(n, dtype=bool)
    if incorrect_only:
        keep &= logits.argmax(axis=1) != labels
    if labels_in is not None:
        keep &= np.isin(labels, np.asarray(labels_in))
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise UserInputError("indices must be a 1-D sequence of ints")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise UserInputError(
                f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]"
            )
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        keep &= mask
    return np.flatnonzero(keep).astype(np.int64)
