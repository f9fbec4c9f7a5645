"""Closed-form per-example parameter gradients of common layers (the "layerwise" back-end).

One batched forward with hooks records the input ``h`` of every parameterised layer; one
batched backward per output cotangent ``v_k`` down to the layer outputs gives ``δ_k``; the
per-example parameter gradients then have closed forms (``δ_k ⊗ h`` for a Linear layer,
``δ_k · unfold(h)ᵀ`` for a convolution, ``δ_k ⊙ ĥ`` for a normalisation, a scatter of ``δ_k``
for an embedding; see :class:`LayerAccumulator`). For a Linear layer applied once per example
the sum of squares needs no per-row gradient at all: ``Σ_k (δ_k ⊗ h)² = (Σ_k δ_k²) ⊗ h²``
(the BackPACK ``BatchDiagGGNExact`` recipe, Dangel et al., "BackPACK: Packing more into
backprop", ICLR 2020).

Applies when every parameter is the weight or bias of a ``Linear``, ``Conv1d``/``Conv2d``
(zero padding), ``BatchNorm1d``/``BatchNorm2d`` (with running statistics), ``LayerNorm`` or
``Embedding`` (no ``max_norm``/``scale_grad_by_freq``/``sparse``), each called once per forward
on tensors whose first axis is the example axis; otherwise :class:`Unsupported` is raised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from curvlake.nn.params import LayerTable


class Unsupported(Exception):
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
    """Raise :class:`Unsupported` for layer settings the closed forms do not cover."""
    name = type(module).__name__
    if type(module) not in _LAYER_TYPES:
        raise Unsupported(f"parameters of unsupported {name}")
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        raise Unsupported(f"{name} with padding_mode={module.padding_mode!r}")
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and module.running_mean is None:
        # without running statistics eval mode still normalises over the batch
        raise Unsupported(f"{name} without running statistics mixes examples")
    if isinstance(module, nn.Embedding) and (
        module.max_norm is not None or module.scale_grad_by_freq or module.sparse
    ):
        raise Unsupported(f"{name} with max_norm / scale_grad_by_freq / sparse")


def layerwise_plan(model: nn.Module, table: LayerTable) -> list[tuple[nn.Module, str]]:
    """(module, 'weight'|'bias') for each tensor of ``table``, or raise :class:`Unsupported`."""
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for role, p in module.named_parameters(recurse=False):
            if id(p) in owner:
                raise Unsupported("a parameter is shared by several modules")
            if role not in ("weight", "bias"):
                raise Unsupported(f"parameter {role!r} of {type(module).__name__}")
            _check_layer(module)
            owner[id(p)] = (module, role)
    by_name = dict(model.named_parameters())
    return [owner[id(by_name[name])] for name in table.names]


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


class LayerAccumulator:
    """Per-example gradients of one supported layer, fed one output cotangent at a time.

    With the layer input ``h`` recorded in the forward and ``δ_k = ∂⟨v_k, z⟩/∂(layer output)``
    from the ``k``-th backward (``z`` the model output, ``v_k`` the ``k``-th cotangent), the
    per-example gradients are, summed over the positions ``t`` / ``l`` where the layer is
    applied,

    * Linear: ``∂/∂W = Σ_t δ_{k,t} ⊗ h_t``, ``∂/∂b = Σ_t δ_{k,t}``;
    * Conv: ``∂/∂W[o, (i, u)] = Σ_l δ_k[o, l] unfold(h)[(i, u), l]`` per group (``u`` runs over
      kernel offsets), ``∂/∂b[o] = Σ_l δ_k[o, l]``;
    * BatchNorm (eval: running statistics) and LayerNorm, ``y = γ ⊙ ĥ + β``:
      ``∂/∂γ = Σ_t δ_{k,t} ⊙ ĥ_t``, ``∂/∂β = Σ_t δ_{k,t}`` with ``ĥ`` the normalised input;
    * Embedding: ``∂/∂E[v] = Σ_{t: h_t = v} δ_{k,t}`` (zero at ``padding_idx``).

    In ``sqsum`` mode only ``Σ_k (∂/∂θ)²`` is kept (added in place into the output). A Linear
    layer applied once per example needs no per-row weight gradient at all:
    ``Σ_k (δ_k ⊗ h)² = (Σ_k δ_k²) ⊗ h²``, so only the ``(n, O)`` sum ``Σ_k δ_k²`` is accumulated
    and the outer product is formed once in :meth:`finish`.

    Args:
        module: The layer (inside ``functional_call``, so it holds the compute-dtype buffers).
        h: Its recorded input, ``(n, ...)``.
        slots: ``'weight'`` / ``'bias'`` -> slice of θ, for the layer's parameters.
        out: ``(n, P)`` in ``sqsum`` mode, else ``(n, K, P)``.
        sqsum: Accumulate squares instead of writing one gradient per cotangent.
    """

    def __init__(
        self,
        module: nn.Module,
        h: torch.Tensor,
        slots: dict[str, slice],
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
        where = self.slots[role]
        return self.out[:, where] if self.sqsum else self.out[:, k, where]

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
                    self.started = True
                    return
                if "weight" in self.slots:
                    gw = self._view("weight", k).view(n, d.shape[1], -1)
                    torch.mul(d.unsqueeze(2), self.h.unsqueeze(1), out=gw)
                self._put("bias", k, d)
                self.started = True
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
        """Write the outer-product form (sqsum Linear), or zeros if no cotangent was fed."""
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
