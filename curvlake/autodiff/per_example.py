"""Per-example gradients from any cotangent at the model output.

For a model ``z = f(x; θ) ∈ R^C`` (logits of a classifier), examples ``x_i`` and cotangents
``v_ik ∈ R^C`` at the output, the per-example gradients are

    G[i, k] = J_iᵀ v_ik ∈ R^P,    J_i = ∂f(x_i; θ)/∂θ ∈ R^{C×P},

i.e. the gradient of ``⟨v_ik, f(x_i; θ)⟩`` with ``v_ik`` held fixed. Every per-example quantity
of the package is such a product:

* the score rows of a per-example Fisher (NPEFF's PEFs, :mod:`curvlake.pipelines.npeff.pefs`):
  ``w_k ∇_θ log p_{c_k}(x) = Jᵀ w_k (e_{c_k} − p)``;
* the gradient of the loss of one example (gradient windows, M-FAC): for cross-entropy
  ``∇_θ ℓ(f(x), y) = Jᵀ (p − e_y)`` (:func:`per_example_loss_grads`).

Cotangents are given as a tensor ``(n, K, C)`` or as a callable that receives the detached
outputs of each batch, so they may depend on the model's own predictions. In ``sqsum`` mode only
``Σ_k G[i, k]²`` (elementwise) is kept: a diagonal of ``Σ_k J_iᵀ v_ik v_ikᵀ J_i`` (e.g. the
diagonal per-example Fisher) without ever holding the ``(n, K, P)`` block.

θ is the flat parameter vector of :mod:`curvlake.nn.params` (every tensor of
``model.named_parameters()``, frozen ones included): column ``j`` of every result is coordinate
``j`` of θ. The model is evaluated in eval mode on copies of its tensors and never modified
(see :mod:`curvlake.autodiff._model`). Results never mix examples: the output for a batch equals
the stacked outputs of its examples, so ``batch_size`` only trades memory for speed.

Two interchangeable back-ends:

* ``"func"``: ``torch.func`` — ``functional_call`` + ``vmap`` over examples + ``vmap`` of a
  ``vjp`` of the output over the ``K`` cotangents. Works for any model made of ops ``vmap``
  supports.
* ``"layerwise"``: one batched forward with hooks, one batched backward per cotangent row to
  the layer outputs, and the closed forms of :mod:`curvlake.autodiff._layerwise` (Linear, Conv,
  BatchNorm, LayerNorm, Embedding layers each called once).

``backend="auto"`` picks ``"layerwise"`` when it applies and falls back to ``"func"`` otherwise
(also mid-run, e.g. when a layer turns out to be called twice). Both give the same numbers up to
float rounding. Cotangent rows that are zero for every example of a batch cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import nn
from torch.func import vjp, vmap

from curvlake.autodiff._layerwise import LayerAccumulator, Unsupported, layerwise_plan
from curvlake.autodiff._losses import get_loss
from curvlake.autodiff._model import (
    CHUNK_BYTES,
    FunctionalModel,
    as_input,
    batches,
    cast_input,
    check_batch_size,
    check_dtype_device,
    check_logits,
    eval_mode,
    resolve_batch_size,
)
from curvlake.errors import UserInputError

__all__ = [
    "Backend",
    "CotangentFn",
    "per_example_grads",
    "per_example_loss_grads",
    "predict_logits",
]

Backend = Literal["auto", "func", "layerwise"]
_BACKENDS = ("auto", "func", "layerwise")

#: Cotangents of one batch: called with the batch's detached outputs ``(b, C)`` and the slice
#: of ``x`` the batch covers; returns the ``(b, K, C)`` cotangents at the output, or a pair
#: ``(cotangents, aux)`` whose ``aux`` is handed back to the caller (``return_aux=True``).
CotangentFn = Callable[[torch.Tensor, slice], torch.Tensor | tuple[torch.Tensor, Any]]


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise UserInputError(f"backend={backend!r} must be one of {_BACKENDS}")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (
        not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1
    ):
        raise UserInputError(f"{name}={value!r} must be a positive int or None")


def _row_chunk(n: int, n_params: int, itemsize: int, k: int, row_chunk: int | None) -> int:
    if row_chunk is not None:
        return row_chunk
    return max(1, min(k, CHUNK_BYTES // max(1, n * n_params * itemsize)))


def _checked_cotangents(
    result: torch.Tensor | tuple[torch.Tensor, Any], logits: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """The cotangent tensor (in the outputs' dtype and device) and the aux of one batch."""
    cot, aux = result if isinstance(result, tuple) else (result, None)
    cot = torch.as_tensor(cot)
    b, C = logits.shape
    if cot.ndim != 3 or cot.shape[0] != b or cot.shape[2] != C or cot.shape[1] < 1:
        raise UserInputError(
            f"cotangents must have shape (n, K >= 1, C={C}) for a batch of n={b}; "
            f"got {tuple(cot.shape)}"
        )
    return cot.to(device=logits.device, dtype=logits.dtype), aux


class _Engine:
    """Per-example gradients ``J_iᵀ v_ik`` of one functional model, batch by batch."""

    def __init__(self, fmodel: FunctionalModel, backend: str) -> None:
        self.fmodel = fmodel
        self.plan: list[tuple[nn.Module, str]] | None = None
        if backend in ("auto", "layerwise"):
            try:
                self.plan = layerwise_plan(fmodel.model, fmodel.table)
            except Unsupported as err:
                if backend == "layerwise":
                    raise UserInputError(f"backend='layerwise' does not apply: {err}") from err
        self.backend = backend

    def run(
        self,
        x: torch.Tensor,
        cotangents: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
        sqsum: bool,
        row_chunk: int | None,
        target: Callable[[int], torch.Tensor],
    ) -> tuple[torch.Tensor, Any]:
        """Gradients of one batch, written into ``target(K)``.

        ``cotangents`` is called exactly once, with the batch's detached outputs. ``target(K)``
        is ``(n, P)`` to be overwritten with ``Σ_k (J_iᵀ v_ik)²`` when ``sqsum``, else a zeroed
        ``(n, K, P)`` view to receive ``J_iᵀ v_ik``.

        Returns:
            ``(logits, aux)``: the batch's outputs and what ``cotangents`` returned beside them.
        """
        if self.plan is not None:
            try:
                return self._run_layerwise(x, cotangents, sqsum, target)
            except Unsupported as err:
                if self.backend == "layerwise":
                    raise UserInputError(f"backend='layerwise' does not apply: {err}") from err
                self.plan = None  # e.g. a layer called twice: fall back for good
        return self._run_func(x, cotangents, sqsum, row_chunk, target)

    # -- torch.func ------------------------------------------------------------------------
    def _run_func(self, x, cotangents, sqsum, row_chunk, target):
        fm = self.fmodel
        with torch.no_grad():
            logits = fm.forward(x)
        check_logits(logits, x.shape[0])
        cot, aux = cotangents(logits)
        n, K = cot.shape[:2]
        out = target(K)

        def per_example(xi: torch.Tensor, cot_i: torch.Tensor) -> dict[str, torch.Tensor]:
            def output_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
                return fm.forward(xi.unsqueeze(0), params)[0]

            _, vjp_fn = vjp(output_of, fm.params)
            return vmap(vjp_fn)(cot_i)[0]

        batched = vmap(per_example)
        if sqsum:
            out.zero_()
        active = torch.nonzero(cot.ne(0).any(2).any(0)).flatten().tolist()
        step = _row_chunk(n, fm.n_params, out.element_size(), max(1, len(active)), row_chunk)
        for j0 in range(0, len(active), step):
            rows = active[j0 : j0 + step]
            grads = batched(x, cot[:, rows])
            for name, where, _ in fm.table.slices():
                g = grads[name].reshape(n, len(rows), -1)
                if sqsum:
                    out[:, where] += g.square().sum(1)
                else:
                    out[:, rows, where] = g
            del grads
        return logits, aux

    # -- layerwise closed forms --------------------------------------------------------------
    def _run_layerwise(self, x, cotangents, sqsum, target):
        # One forward with hooks; then one ordinary backward per cotangent row (cheaper on CPU
        # than is_grads_batched, whose vmap falls back to a slow loop for e.g. max-pool
        # backward); per-layer gradients are streamed into the output: nothing (n, K, P)-sized
        # is formed in sqsum mode, so row_chunk does not apply.
        fm, plan = self.fmodel, self.plan
        modules = list(dict.fromkeys(m for m, _ in plan))
        seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            name = type(module).__name__
            if module in seen:
                raise Unsupported(f"{name} is called more than once")
            if args[0].shape[0] != x.shape[0] or output.shape[0] != x.shape[0]:
                # e.g. (n, T, d) reshaped to (n·T, d): rows are no longer examples
                raise Unsupported(f"{name} input/output does not keep the example axis first")
            seen[module] = (args[0].detach(), output)

        handles = [m.register_forward_hook(hook) for m in modules]
        # Leaf copies that require grad put the layer outputs on the autograd graph; only the
        # outputs are differentiated, never the parameters themselves.
        params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        try:
            with torch.enable_grad():
                logits = fm.forward(x, params)
        finally:
            for handle in handles:
                handle.remove()
        check_logits(logits, x.shape[0])
        with torch.no_grad():
            cot, aux = cotangents(logits.detach())
            out = target(cot.shape[1])
        slots: dict[nn.Module, dict[str, slice]] = {m: {} for m in modules}
        for (module, role), (_, where, _) in zip(plan, fm.table.slices(), strict=True):
            slots[module][role] = where
        used = [m for m in modules if m in seen]
        accs = [LayerAccumulator(m, seen[m][0], slots[m], out, sqsum) for m in used]
        outputs = [seen[m][1] for m in used]
        active = torch.nonzero(cot.ne(0).any(2).any(0)).flatten().tolist()
        for j, k in enumerate(active):
            deltas = torch.autograd.grad(
                logits,
                outputs,
                grad_outputs=cot[:, k],
                retain_graph=j + 1 < len(active),
                allow_unused=True,
            )
            with torch.no_grad():
                for acc, delta in zip(accs, deltas, strict=True):
                    if delta is not None:
                        acc.add(k, delta)
        with torch.no_grad():
            for acc in accs:
                acc.finish()
            if sqsum:  # layers never called have zero gradient
                for module in modules:
                    if module not in seen:
                        for where in slots[module].values():
                            out[:, where] = 0
        return logits.detach(), aux


def _drive(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    cotangents: CotangentFn,
    *,
    sqsum: bool,
    dtype: torch.dtype,
    device: torch.device | str | None,
    batch_size: int | None,
    backend: str,
    row_chunk: int | None = None,
    n_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Run the engine over batches of ``x``, writing every batch into one preallocated result.

    Returns:
        ``(grads, logits, auxes)``: ``grads`` is ``(n, P)`` (``sqsum``) or ``(n, R, P)`` with
        ``R = n_rows`` or the first batch's ``K`` (rows beyond a batch's ``K`` stay zero);
        ``logits`` ``(n, C)``; ``auxes`` one entry per batch, in order.
    """
    _check_backend(backend)
    dtype, device = check_dtype_device(model, dtype, device)
    check_batch_size(batch_size)
    _check_positive("row_chunk", row_chunk)
    _check_positive("n_rows", n_rows)
    with eval_mode(model):
        fmodel = FunctionalModel(model, dtype, device)
        x = as_input(x)
        n, P = x.shape[0], fmodel.n_params
        engine = _Engine(fmodel, backend)
        batch_size = resolve_batch_size(batch_size, P, dtype)
        result: dict[str, torch.Tensor] = {}

        def target(sl: slice, width: int) -> torch.Tensor:
            if "grads" not in result:
                if sqsum:  # every column is written by the engines
                    result["grads"] = torch.empty((n, P), dtype=dtype, device=device)
                else:  # inactive and padding rows stay zero
                    rows = n_rows or width
                    result["grads"] = torch.zeros((n, rows, P), dtype=dtype, device=device)
            grads = result["grads"]
            if sqsum:
                return grads[sl]
            if width > grads.shape[1]:
                raise UserInputError(
                    f"the cotangents of examples [{sl.start}, {sl.stop}) have K={width} rows, "
                    f"more than the {grads.shape[1]} of the result; pass n_rows >= the largest K"
                )
            return grads[sl, :width]

        logits, auxes = [], []
        for sl in batches(n, batch_size):
            xb = cast_input(x[sl], dtype, device)
            z, aux = engine.run(
                xb,
                lambda z, sl=sl: _checked_cotangents(cotangents(z, sl), z),
                sqsum,
                row_chunk,
                lambda width, sl=sl: target(sl, width),
            )
            logits.append(z)
            auxes.append(aux)
    return result["grads"], torch.cat(logits), auxes


def _as_cotangent_fn(cotangents: CotangentFn | torch.Tensor | np.ndarray, n: int) -> CotangentFn:
    if callable(cotangents):
        return cotangents
    fixed = torch.as_tensor(cotangents)
    if fixed.ndim != 3 or fixed.shape[0] != n:
        raise UserInputError(f"cotangents must have shape (n={n}, K, C), got {tuple(fixed.shape)}")
    if not fixed.is_floating_point():
        raise UserInputError(f"cotangents must be floating, got {fixed.dtype}")
    return lambda logits, rows: fixed[rows]


@overload
def per_example_grads(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    cotangents: CotangentFn | torch.Tensor | np.ndarray,
    *,
    sqsum: bool = ...,
    dtype: torch.dtype = ...,
    device: torch.device | str | None = ...,
    batch_size: int | None = ...,
    backend: Backend = ...,
    n_rows: int | None = ...,
    row_chunk: int | None = ...,
    return_aux: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def per_example_grads(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    cotangents: CotangentFn | torch.Tensor | np.ndarray,
    *,
    sqsum: bool = ...,
    dtype: torch.dtype = ...,
    device: torch.device | str | None = ...,
    batch_size: int | None = ...,
    backend: Backend = ...,
    n_rows: int | None = ...,
    row_chunk: int | None = ...,
    return_aux: Literal[True],
) -> tuple[torch.Tensor, list[Any]]: ...


def per_example_grads(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    cotangents: CotangentFn | torch.Tensor | np.ndarray,
    *,
    sqsum: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
    n_rows: int | None = None,
    row_chunk: int | None = None,
    return_aux: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[Any]]:
    """Per-example gradients ``G[i, k] = J_iᵀ v_ik`` of the model output's pairing with ``v``.

    ``J_i = ∂f(x_i; θ)/∂θ`` is the ``C × P`` Jacobian of the model output at example ``i``, so
    ``G[i, k] = ∇_θ ⟨v_ik, f(x_i; θ)⟩`` with the cotangent ``v_ik`` held fixed. With
    ``sqsum=True`` only ``S[i] = Σ_k G[i, k]²`` (elementwise) is returned, i.e.
    ``diag(J_iᵀ (Σ_k v_ik v_ikᵀ) J_i)``; it depends on the cotangents only through
    ``Σ_k v_ik v_ikᵀ``, so any square root of that ``C × C`` matrix may be passed.

    Args:
        model: Module mapping a batch ``(n, ...)`` to outputs ``(n, C)``.
        x: Inputs ``(n, ...)``; floating inputs are cast to ``dtype``, integer ones kept.
        cotangents: ``(n, K, C)`` tensor, or a :data:`CotangentFn` called once per batch with
            the detached outputs ``(b, C)`` (in ``dtype``) and the slice of ``x`` it covers,
            returning ``(b, K, C)`` cotangents or ``(cotangents, aux)``.
        sqsum: Return the ``(n, P)`` sums of squares instead of the ``(n, K, P)`` gradients.
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (memory ``~ batch_size · K · P``; default:
            a ~256 MiB ``(batch, P)`` block, at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"`` (see the module docstring).
        n_rows: ``K`` of the result when batches return different ``K`` (smaller ones are
            zero-padded); default: the first batch's ``K``.
        row_chunk: Cotangent rows per vectorised step of the ``"func"`` back-end (default: as
            many as fit a ~256 MiB ``(batch, rows, P)`` block).
        return_aux: Also return the list of per-batch ``aux`` values (``None`` for a batch
            whose cotangents came without one), in batch order.

    Returns:
        ``(n, K, P)`` gradients (``(n, P)`` with ``sqsum``), columns in θ order; with
        ``return_aux`` the pair ``(gradients, auxes)``.
    """
    n = len(as_input(x))
    grads, _, auxes = _drive(
        model,
        x,
        _as_cotangent_fn(cotangents, n),
        sqsum=sqsum,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
        row_chunk=row_chunk,
        n_rows=n_rows,
    )
    return (grads, auxes) if return_aux else grads


def per_example_loss_grads(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    loss: str = "cross_entropy",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Gradient of the loss of each example alone, ``g_i = ∇_θ ℓ(f(x_i; θ), y_i) = J_iᵀ ∂ℓ/∂z``.

    Convention: ``g_i`` is the gradient of the *unreduced* loss of example ``i``, so the
    gradient of the mean loss ``(1/n) Σ_i ℓ_i`` (``reduction="mean"``) is ``g.mean(0)`` and that
    of the summed loss is ``g.sum(0)``. For cross-entropy the cotangent is ``∂ℓ/∂z = p − e_y``
    (one row, ``K = 1``).

    Args:
        model: Classifier mapping ``(n, ...)`` to logits ``(n, C)``.
        x: Inputs ``(n, ...)``.
        y: ``(n,)`` integer class labels in ``[0, C)``.
        loss: ``"cross_entropy"``.
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per vectorised step (default: a ~256 MiB ``(batch, P)`` block,
            at most 256 examples).
        backend: ``"auto"``, ``"func"`` or ``"layerwise"``.

    Returns:
        ``(n, P)`` tensor, columns in θ order.
    """
    loss_fn = get_loss(loss)
    n = len(as_input(x))
    targets = loss_fn.check_targets(y, n)

    def cotangents(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        yb = targets[rows].to(logits.device)
        loss_fn.check_against_outputs(yb, logits.shape[1])
        return loss_fn.output_grad(logits, yb).unsqueeze(1)

    grads = per_example_grads(
        model,
        x,
        cotangents,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
    )
    return grads[:, 0]


def predict_logits(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Eval-mode outputs ``(n, C)`` of ``model`` on ``x``, on the same copies the gradients use.

    Args:
        model: Module mapping ``(n, ...)`` to ``(n, C)``.
        x: Inputs ``(n, ...)``.
        dtype: Compute and output dtype.
        device: Compute device (default: the model's).
        batch_size: Examples per forward pass (default as for :func:`per_example_grads`).

    Returns:
        ``(n, C)`` tensor.
    """
    dtype, device = check_dtype_device(model, dtype, device)
    check_batch_size(batch_size)
    with eval_mode(model), torch.no_grad():
        fmodel = FunctionalModel(model, dtype, device)
        x = as_input(x)
        batch_size = resolve_batch_size(batch_size, fmodel.n_params, dtype)
        parts = [
            fmodel.forward(cast_input(x[sl], dtype, device)) for sl in batches(len(x), batch_size)
        ]
    logits = torch.cat(parts)
    check_logits(logits, x.shape[0])
    return logits
