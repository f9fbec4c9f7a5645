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

Conventions used throughout the module:

* ``θ`` is the concatenation of the *trainable* parameters (``requires_grad=True``), each
  flattened row-major, in ``model.named_parameters()`` order (see :func:`layer_table`); this is
  the column index space ``[0, P)`` of every PEF.
* The model is evaluated in eval mode (its train/eval flags are restored afterwards) on
  ``x`` cast to ``dtype`` / ``device``; the model itself is never modified: its parameters and
  buffers are copied to ``dtype`` / ``device`` and injected with ``torch.func.functional_call``.
* Results never mix examples: every kernel is a map over examples, so the output for a batch
  equals the stacked outputs for its examples (``batch_size`` only trades memory for speed).

Two interchangeable gradient back-ends compute the per-example, per-class gradients:

* ``"func"``: ``torch.func`` — ``functional_call`` + ``vmap`` over examples + ``vmap`` of a
  ``vjp`` over class cotangents. Works for any classifier made of ops ``vmap`` supports.
* ``"layerwise"``: one batched forward with hooks that record the input ``h`` of every
  parameterised layer, one batched backward per class cotangent ``k`` down to the layer outputs
  (``δ_k``), and the closed forms of the per-example parameter gradients (``δ_k ⊗ h`` for a
  Linear layer, ``δ_k · unfold(h)ᵀ`` for a convolution, ``δ_k ⊙ ĥ`` for a normalisation, a
  scatter of ``δ_k`` for an embedding; see ``_LayerAccumulator``). For a Linear layer applied
  once per example the diagonal needs no per-class gradient at all:
  ``Σ_k (δ_k ⊗ h)² = (Σ_k δ_k²) ⊗ h²`` (the BackPACK ``BatchDiagGGNExact`` recipe, Dangel et al.,
  "BackPACK: Packing more into backprop", ICLR 2020). Applies when every trainable parameter
  is the weight or bias of a ``Linear``, ``Conv1d``/``Conv2d`` (zero padding),
  ``BatchNorm1d``/``BatchNorm2d`` (with running statistics), ``LayerNorm`` or ``Embedding``
  (no ``max_norm``/``scale_grad_by_freq``/``sparse``), each called once per forward on
  tensors whose first axis is the example axis.

``backend="auto"`` picks ``"layerwise"`` when it applies and falls back to ``"func"`` otherwise
(also mid-run, e.g. when a layer turns out to be called twice). Both give the same numbers up
to float rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from curvlake.errors import UserInputError

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

Backend = Literal["auto", "func", "layerwise"]
_BACKENDS = ("auto", "func", "layerwise")
_MAX_DEFAULT_BATCH = 256
# Budget for the largest transient per-class gradient block (bytes); bounds memory in the
# D-PEF / DSF kernels which only keep the (n, P) sum.
_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# Functional view of a model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter tensor's slot in the flat parameter vector θ.

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


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def layer_table(model: nn.Module) -> list[ParamInfo]:
    """Layout of θ: one :class:`ParamInfo` per trainable parameter in ``named_parameters()`` order.

    Args:
        model: Any ``nn.Module``. Parameters with ``requires_grad=False`` are not part of θ
            (NPEFF uses the trainable variables only); tied parameters appear once.

    Returns:
        The table; ``table[-1].offset + table[-1].size == P``.
    """
    table, offset = [], 0
    for name, p in _trainable(model):
        table.append(ParamInfo(name, offset, p.numel(), tuple(p.shape)))
        offset += p.numel()
    return table


def flat_params(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flat trainable parameter vector θ ∈ R^P in :func:`layer_table` order (a detached copy).

    Args:
        model: Any ``nn.Module``.
        dtype: Floating dtype of the result.
        device: Device of the result (default: the model's).

    Returns:
        1-D tensor of length P.
    """
    dtype, device = _check_dtype_device(model, dtype, device)
    parts = [p.detach().reshape(-1).to(device=device, dtype=dtype) for _, p in _trainable(model)]
    if not parts:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat(parts)


def _check_dtype_device(
    model: nn.Module, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserInputError(f"dtype={dtype!r} must be a floating torch.dtype (e.g. torch.float32)")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    return dtype, torch.device(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (dropout off, BatchNorm on running stats), then restore flags."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class _Prepared:
    """The model's parameters and buffers as ``dtype`` / ``device`` copies for functional_call."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.dtype = dtype
        self.device = device
        self.table = layer_table(model)
        self.n_params = self.table[-1].offset + self.table[-1].size if self.table else 0
        if self.n_params == 0:
            raise UserInputError("model has no trainable parameters (requires_grad=True)")
        self.params = {
            name: p.detach().to(device=device, dtype=dtype) for name, p in _trainable(model)
        }
        self.frozen: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                self.frozen[name] = p.detach().to(device=device, dtype=dtype)
        for name, b in model.named_buffers():
            self.frozen[name] = (
                b.to(device=device, dtype=dtype) if b.is_floating_point() else b.to(device)
            )

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        tensors = {**self.frozen, **(self.params if params is None else params)}
        return functional_call(self.model, tensors, (x,))


def _as_input(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim < 1 or x.shape[0] == 0:
        raise UserInputError(f"x must have a leading example axis with n >= 1, got {x.shape}")
    return x


def _cast_input(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Floating inputs go to ``dtype``; integer inputs (token ids) keep theirs."""
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)


def _check_logits(logits: torch.Tensor, n: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != n:
        raise UserInputError(
            f"the model must map a batch of {n} examples to logits of shape (n, C); "
            f"got output shape {tuple(logits.shape)}"
        )


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise UserInputError(f"batch_size={batch_size!r} must be a positive int or None")


def _resolve_batch_size(batch_size: int | None, n_params: int, dtype: torch.dtype) -> int:
    """Default: as many examples as fit a ~256 MiB ``(batch, P)`` block, between 1 and 256."""
    if batch_size is not None:
        return batch_size
    per_example = max(1, n_params * torch.finfo(dtype).bits // 8)
    return int(max(1, min(_MAX_DEFAULT_BATCH, _CHUNK_BYTES // per_example)))


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


# ---------------------------------------------------------------------------------------------
# Gradient back-ends
# ---------------------------------------------------------------------------------------------

# A class selection maps log-probabilities (n, C) to (classes (n, K) int64, weights (n, K)):
# the per-example cotangent on log-softmax is v_i = Σ_k w_ik e_{c_ik}, whose gradient is
# Σ_k w_ik ∇ log p_{c_ik}(x_i). Every PEF variant is such a selection.
Selection = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _Unsupported(Exception):
    """The layerwise back-end cannot handle this model or forward pass."""


_LAYER_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.Embedding,
)


def _check_layer(module: nn.Module) -> None:
    """Raise :class:`_Unsupported` for layer settings the closed forms do not cover."""
    name = type(module).__name__
    if type(module) not in _LAYER_TYPES:
        raise _Unsupported(f"parameters of unsupported {name}")
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        raise _Unsupported(f"{name} with padding_mode={module.padding_mode!r}")
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and module.running_mean is None:
        # without running statistics eval mode still normalises over the batch
        raise _Unsupported(f"{name} without running statistics mixes examples")
    if isinstance(module, nn.Embedding) and (
        module.max_norm is not None or module.scale_grad_by_freq or module.sparse
    ):
        raise _Unsupported(f"{name} with max_norm / scale_grad_by_freq / sparse")


def _layerwise_plan(model: nn.Module, table: list[ParamInfo]) -> list[tuple[nn.Module, str]]:
    """(module, 'weight'|'bias') for each entry of ``table``, or raise :class:`_Unsupported`."""
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for role, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if id(p) in owner:
                raise _Unsupported("a parameter is shared by several modules")
            if role not in ("weight", "bias"):
                raise _Unsupported(f"parameter {role!r} of {type(module).__name__}")
            _check_layer(module)
            owner[id(p)] = (module, role)
    by_name = dict(_trainable(model))
    return [owner[id(by_name[info.name])] for info in table]


def _conv_padding(module: nn.Module) -> list[int]:
    """F.pad amounts (last dim first) that reproduce the module's zero padding."""
    ks, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * len(ks)
        else:  # "same" (stride 1): PyTorch puts the extra element on the right
            pads = []
            for k, d in zip(ks, dil, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    out: list[int] = []
    for left, right in reversed(pads):
        out += [left, right]
    return out


class _LayerAccumulator:
    """Per-example gradients of one supported layer, fed one class cotangent at a time.

    With the layer input ``h`` recorded in the forward and ``δ_k = ∂(w_k log p_{c_k})/∂(layer
    output)`` from the ``k``-th backward, the per-example gradients are, summed over the
    positions ``t`` / ``l`` where the layer is applied,

    * Linear: ``∂/∂W = Σ_t δ_{k,t} ⊗ h_t``, ``∂/∂b = Σ_t δ_{k,t}``;
    * Conv: ``∂/∂W[o, (i, u)] = Σ_l δ_k[o, l] unfold(h)[(i, u), l]`` per group (``u`` runs over
      kernel offsets), ``∂/∂b[o] = Σ_l δ_k[o, l]``;
    * BatchNorm (eval: running statistics) and LayerNorm, ``y = γ ⊙ ĥ + β``:
      ``∂/∂γ = Σ_t δ_{k,t} ⊙ ĥ_t``, ``∂/∂β = Σ_t δ_{k,t}`` with ``ĥ`` the normalised input;
    * Embedding: ``∂/∂E[v] = Σ_{t: h_t = v} δ_{k,t}`` (zero at ``padding_idx``).

    In ``sqsum`` mode only ``Σ_k (∂/∂θ)²`` is kept (added in place into the output). A Linear
    layer applied once per example needs no per-class weight gradient at all:
    ``Σ_k (δ_k ⊗ h)² = (Σ_k δ_k²) ⊗ h²``, so only the ``(n, O)`` sum ``Σ_k δ_k²`` is accumulated
    and the outer product is formed once in :meth:`finish`.
    """

    def __init__(
        self,
        module: nn.Module,
        h: torch.Tensor,
        slots: dict[str, ParamInfo],
        out: torch.Tensor,
        sqsum: bool,
    ) -> None:
        self.module, self.slots, self.out, self.sqsum = module, slots, out, sqsum
        self.n = n = h.shape[0]
        self.started = False
        self.outer = False
        if isinstance(module, nn.Linear):
            self.kind = "linear"
            self.h = h.reshape(n, -1, h.shape[-1])
            self.outer = self.h.shape[1] == 1
            if self.outer:
                self.h = self.h[:, 0]
                self.d2 = torch.zeros((n, module.out_features), dtype=h.dtype, device=h.device)
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            self.kind = "conv"
            if "weight" in slots:
                pad = _conv_padding(module)
                if any(pad):
                    h = F.pad(h, pad)
                if isinstance(module, nn.Conv1d):
                    h = h.unsqueeze(2)
                    ks, dil, st = (
                        (1, *module.kernel_size),
                        (1, *module.dilation),
                        (1, *module.stride),
                    )
                else:
                    ks, dil, st = module.kernel_size, module.dilation, module.stride
                u = F.unfold(h, ks, dilation=dil, stride=st)  # (n, I·|kernel|, L), channel-major
                self.u_t = u.reshape(n, module.groups, -1, u.shape[-1]).transpose(-1, -2)
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            self.kind = "batchnorm"
            # Inside functional_call the module holds the dtype/device copies of its buffers.
            scale = torch.rsqrt(module.running_var + module.eps)
            shape = (1, -1) + (1,) * (h.ndim - 2)
            self.h_hat = ((h - module.running_mean.view(shape)) * scale.view(shape)).reshape(
                n, h.shape[1], -1
            )
        elif isinstance(module, nn.LayerNorm):
            self.kind = "layernorm"
            dims = tuple(range(h.ndim - len(module.normalized_shape), h.ndim))
            var, mean = torch.var_mean(h, dim=dims, keepdim=True, correction=0)
            size = math.prod(module.normalized_shape)
            self.h_hat = ((h - mean) * torch.rsqrt(var + module.eps)).reshape(n, -1, size)
        else:
            self.kind = "embedding"
            self.index = h.reshape(n, -1)
            self.shape = (n, module.num_embeddings, module.embedding_dim)

    def _view(self, role: str, k: int) -> torch.Tensor:
        info = self.slots[role]
        if self.sqsum:
            return self.out[:, info.offset : info.offset + info.size]
        return self.out[:, k, info.offset : info.offset + info.size]

    def _put(self, role: str, k: int, g: torch.Tensor) -> None:
        if role not in self.slots:
            return
        view = self._view(role, k)
        if not self.sqsum:
            view.copy_(g)
        elif self.started:
            view.addcmul_(g, g)
        else:
            torch.mul(g, g, out=view)

    def add(self, k: int, delta: torch.Tensor) -> None:
        """Feed ``δ_k`` of shape ``(n, *layer_output_shape)``."""
        n, module, kind = self.n, self.module, self.kind
        if kind == "linear":
            d = delta.reshape(n, -1, delta.shape[-1])
            if self.outer:
                d = d[:, 0]
                if self.sqsum:
                    self.d2.addcmul_(d, d)
                    return
                if "weight" in self.slots:
                    gw = self._view("weight", k).view(n, d.shape[1], -1)
                    torch.mul(d.unsqueeze(2), self.h.unsqueeze(1), out=gw)
                self._put("bias", k, d)
                return
            if "weight" in self.slots:
                self._put("weight", k, torch.bmm(d.transpose(1, 2), self.h).reshape(n, -1))
            self._put("bias", k, d.sum(1))
        elif kind == "conv":
            g = module.groups
            d = delta.reshape(n, g, module.out_channels // g, -1)
            if "weight" in self.slots:
                self._put("weight", k, torch.matmul(d, self.u_t).reshape(n, -1))
            self._put("bias", k, d.sum(-1).reshape(n, -1))
        elif kind in ("batchnorm", "layernorm"):
            if kind == "batchnorm":
                d = delta.reshape(n, delta.shape[1], -1)
                reduce_dim = -1
            else:
                d = delta.reshape(self.h_hat.shape)
                reduce_dim = 1
            self._put("weight", k, (d * self.h_hat).sum(reduce_dim))
            self._put("bias", k, d.sum(reduce_dim))
        else:
            d = delta.reshape(n, -1, self.shape[2])
            gw = torch.zeros(self.shape, dtype=d.dtype, device=d.device)
            gw.scatter_add_(1, self.index.unsqueeze(-1).expand_as(d), d)
            if module.padding_idx is not None:
                gw[:, module.padding_idx] = 0
            self._put("weight", k, gw.reshape(n, -1))
        self.started = True

    def finish(self) -> None:
        """Write the outer-product form (sqsum Linear) or zeros if no class was fed."""
        if self.outer and self.sqsum:
            if "weight" in self.slots:
                h2 = self.h.square()
                view = self._view("weight", 0).view(self.n, self.d2.shape[1], -1)
                torch.mul(self.d2.unsqueeze(2), h2.unsqueeze(1), out=view)
            if "bias" in self.slots:
                self._view("bias", 0).copy_(self.d2)
        elif self.sqsum and not self.started:
            for role in self.slots:
                self._view(role, 0).zero_()


def _class_chunk(n: int, n_params: int, itemsize: int, K: int, class_chunk: int | None) -> int:
    if class_chunk is not None:
        return class_chunk
    return max(1, min(K, _CHUNK_BYTES // max(1, n * n_params * itemsize)))


class _Engine:
    """Per-example, per-class log-probability gradients of one prepared model."""

    def __init__(self, prep: _Prepared, backend: str) -> None:
        self.prep = prep
        self.plan: list[tuple[nn.Module, str]] | None = None
        if backend in ("auto", "layerwise"):
            try:
                self.plan = _layerwise_plan(prep.model, prep.table)
            except _Unsupported as err:
                if backend == "layerwise":
                    raise UserInputError(f"backend='layerwise' does not apply: {err}") from err
        self.backend = backend

    def run(
        self,
        x: torch.Tensor,
        select: Selection,
        sqsum: bool,
        class_chunk: int | None,
        target: Callable[[int], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of one batch, written into ``target(K)``.

        ``target(K)`` is ``(n, P)`` to be overwritten with ``Σ_k (w_k ∇ log p_{c_k})²`` when
        ``sqsum``, else a zeroed ``(n, K, P)`` view to receive ``w_k ∇ log p_{c_k}``.

        Returns:
            ``(log_probs, classes, weights)``.
        """
        if self.plan is not None:
            try:
                return self._run_layerwise(x, select, sqsum, target)
            except _Unsupported as err:
                if self.backend == "layerwise":
                    raise UserInputError(f"backend='layerwise' does not apply: {err}") from err
                self.plan = None  # e.g. a layer called twice: fall back for good
        return self._run_func(x, select, sqsum, class_chunk, target)

    # -- torch.func ------------------------------------------------------------------------
    def _run_func(self, x, select, sqsum, class_chunk, target):
        prep = self.prep
        with torch.no_grad():
            logits = prep.forward(x)
        _check_logits(logits, x.shape[0])
        log_probs = torch.log_softmax(logits, dim=-1)
        classes, weights = select(log_probs)
        n, K, C, P = x.shape[0], classes.shape[1], logits.shape[1], prep.n_params
        cot = weights.unsqueeze(-1) * F.one_hot(classes, C).to(weights.dtype)  # (n, K, C)

        def per_example(xi: torch.Tensor, cot_i: torch.Tensor) -> dict[str, torch.Tensor]:
            def log_softmax_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.log_softmax(prep.forward(xi.unsqueeze(0), params), dim=-1)[0]

            _, vjp_fn = vjp(log_softmax_of, prep.params)
            return vmap(vjp_fn)(cot_i)[0]

        batched = vmap(per_example)
        out = target(K)
        if not sqsum:
            grads = batched(x, cot)
            for info in prep.table:
                out[:, :, info.offset : info.offset + info.size] = grads[info.name].reshape(
                    n, K, -1
                )
            return log_probs, classes, weights
        out.zero_()
        step = _class_chunk(n, P, out.element_size(), K, class_chunk)
        for k0 in range(0, K, step):
            grads = batched(x, cot[:, k0 : k0 + step])
            for info in prep.table:
                g = grads[info.name].reshape(n, -1, info.size)
                out[:, info.offset : info.offset + info.size] += g.square().sum(1)
            del grads
        return log_probs, classes, weights

    # -- layerwise closed forms --------------------------------------------------------------
    def _run_layerwise(self, x, select, sqsum, target):
        # One forward with hooks; then one ordinary backward per class (cheaper on CPU than
        # is_grads_batched, whose vmap falls back to a slow loop for e.g. max-pool backward);
        # per-layer gradients are streamed into the output: nothing (n, K, P)-sized is formed
        # in sqsum mode, so class_chunk does not apply.
        prep, plan = self.prep, self.plan
        modules = list(dict.fromkeys(m for m, _ in plan))
        seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            name = type(module).__name__
            if module in seen:
                raise _Unsupported(f"{name} is called more than once")
            if args[0].shape[0] != x.shape[0] or output.shape[0] != x.shape[0]:
                # e.g. (n, T, d) reshaped to (n·T, d): rows are no longer examples
                raise _Unsupported(f"{name} input/output does not keep the example axis first")
            seen[module] = (args[0].detach(), output)

        handles = [m.register_forward_hook(hook) for m in modules]
        # Leaf copies that require grad put the layer outputs on the autograd graph; only the
        # outputs are differentiated, never the parameters themselves.
        params = {k: v.detach().requires_grad_(True) for k, v in prep.params.items()}
        try:
            with torch.enable_grad():
                logits = prep.forward(x, params)
        finally:
            for handle in handles:
                handle.remove()
        _check_logits(logits, x.shape[0])
        with torch.no_grad():
            log_probs = torch.log_softmax(logits.detach(), dim=-1)
            classes, weights = select(log_probs)
            K, C = classes.shape[1], logits.shape[1]
            # ∂/∂z Σ_k w_k log p_{c_k} = Σ_k w_k (e_{c_k} − p): closed form at the logits.
            onehot = F.one_hot(classes.clamp_min(0), C).to(log_probs.dtype)
            g_logits = weights.unsqueeze(-1) * (onehot - log_probs.exp().unsqueeze(1))
            out = target(K)
        slots: dict[nn.Module, dict[str, ParamInfo]] = {m: {} for m in modules}
        for (module, role), info in zip(plan, prep.table, strict=True):
            slots[module][role] = info
        used = [m for m in modules if m in seen]
        accs = [_LayerAccumulator(m, seen[m][0], slots[m], out, sqsum) for m in used]
        outputs = [seen[m][1] for m in used]
        if sqsum:  # only Σ_k g_k g_kᵀ matters: C − 1 rows carry it when all classes are kept
            with torch.no_grad():
                g_logits = _square_root_rows(g_logits, weights)
        active = [k for k in range(g_logits.shape[1]) if bool(g_logits[:, k].ne(0).any())]
        for j, k in enumerate(active):
            deltas = torch.autograd.grad(
                logits,
                outputs,
                grad_outputs=g_logits[:, k],
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
                        for info in slots[module].values():
                            out[:, info.offset : info.offset + info.size] = 0
        return log_probs, classes, weights


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


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise UserInputError(f"backend={backend!r} must be one of {_BACKENDS}")


def _drive(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``select`` over batches of ``x``, writing every batch into one preallocated result.

    Returns:
        ``(grads, log_probs, classes, weights)``: ``grads`` is ``(n, P)`` (``sqsum``) or
        ``(n, R, P)`` with ``R = n_rows`` or the selection's width; ``classes`` / ``weights``
        are ``(n, R)``, padded with class −1 and weight 0 (and zero gradient rows).
    """
    _check_backend(backend)
    dtype, device = _check_dtype_device(model, dtype, device)
    _check_batch_size(batch_size)
    if class_chunk is not None and (not isinstance(class_chunk, int) or class_chunk < 1):
        raise UserInputError(f"class_chunk={class_chunk!r} must be a positive int or None")
    with _eval_mode(model):
        prep = _Prepared(model, dtype, device)
        x = _as_input(x)
        n, P = x.shape[0], prep.n_params
        engine = _Engine(prep, backend)
        batch_size = _resolve_batch_size(batch_size, prep.n_params, dtype)
        result: dict[str, torch.Tensor] = {}

        def target(sl: slice, width: int) -> torch.Tensor:
            if "grads" not in result:
                rows = n_rows or width
                if sqsum:  # every column is written by the engines
                    result["grads"] = torch.empty((n, P), dtype=dtype, device=device)
                else:  # inactive and padding rows stay zero
                    result["grads"] = torch.zeros((n, rows, P), dtype=dtype, device=device)
            grads = result["grads"]
            if sqsum:
                return grads[sl]
            if width > grads.shape[1]:
                raise AssertionError("selection wider than the allocated rows")
            return grads[sl, :width]

        parts = []
        for sl in _batches(n, batch_size):
            xb = _cast_input(x[sl], dtype, device)
            parts.append(engine.run(xb, select, sqsum, class_chunk, lambda w, sl=sl: target(sl, w)))
    width = max([p[1].shape[1] for p in parts] + [n_rows or 0])
    log_probs = torch.cat([p[0] for p in parts])
    classes = torch.cat([F.pad(p[1], (0, width - p[1].shape[1]), value=-1) for p in parts])
    weights = torch.cat([F.pad(p[2], (0, width - p[2].shape[1])) for p in parts])
    return result["grads"], log_probs, classes, weights


# ---------------------------------------------------------------------------------------------
# Class selections
# ---------------------------------------------------------------------------------------------


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

    def select(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    def select(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_k("top_k_classes", top_k, log_probs.shape[1])
        classes = top_classes(log_probs, top_k)
        return classes, log_probs.gather(1, classes).exp().sqrt()

    return select


# ---------------------------------------------------------------------------------------------
# Public PEF kernels
# ---------------------------------------------------------------------------------------------


def predict_logits(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Eval-mode logits ``(n, C)`` of ``model`` on ``x`` (what NPEFF stores next to PEFs)."""
    dtype, device = _check_dtype_device(model, dtype, device)
    _check_batch_size(batch_size)
    with _eval_mode(model), torch.no_grad():
        prep = _Prepared(model, dtype, device)
        x = _as_input(x)
        batch_size = _resolve_batch_size(batch_size, prep.n_params, dtype)
        parts = [
            prep.forward(_cast_input(x[sl], dtype, device)) for sl in _batches(len(x), batch_size)
        ]
    logits = torch.cat(parts)
    _check_logits(logits, x.shape[0])
    return logits


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

    Computed with ``torch.func`` (``functional_call``, ``vmap`` over examples, ``vmap`` of a
    ``vjp`` over the ``K`` one-hot cotangents) or, for Linear/Conv models, the equivalent
    layerwise closed form (see the module docstring).

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
    pos = {"start": 0}

    def select(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, C = log_probs.shape
        sl = slice(pos["start"], pos["start"] + b)
        pos["start"] += b
        c = torch.arange(C).expand(b, C) if cls is None else cls[sl]
        if (c < 0).any() or (c >= C).any():
            raise UserInputError(f"classes must lie in [0, {C})")
        ww = torch.ones(c.shape, dtype=log_probs.dtype) if w is None else w[sl]
        return c.to(log_probs.device), ww.to(device=log_probs.device, dtype=log_probs.dtype)

    grads, *_ = _drive(
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
    f, *_ = _drive(
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
    a, *_ = _drive(
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
    a, _, classes, weights = _drive(
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
    dtype, _ = _check_dtype_device(model, dtype, device)
    _check_batch_size(batch_size)
    n = len(x)
    n_params = sum(p.numel() for _, p in _trainable(model))
    batch_size = _resolve_batch_size(batch_size, n_params, dtype)
    if mode == "sampling":
        u = _example_uniforms(int(seed), int(example_offset), int(example_offset) + n)
    total = None
    # One batch at a time so that only a (batch, P) block of squared gradients is alive.
    for sl in _batches(n, batch_size):
        if mode == "expectation":
            select = _probable_classes(None, None)
        else:
            select = _sampled_class(u[sl])
        f, *_ = _drive(
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

    def select(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = log_probs.shape[0]
        cdf = np.cumsum(log_probs.detach().to("cpu", torch.float64).exp().numpy(), axis=1)
        y = np.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(axis=1), cdf.shape[1] - 1)
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
    for sl in _batches(n, block_size):
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
