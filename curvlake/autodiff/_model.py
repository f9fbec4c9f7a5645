"""A functional, eval-mode view of a model, and the input checks every derivative shares.

Every derivative of :mod:`curvlake.autodiff` is taken on copies: the parameters and buffers
are copied to the compute ``dtype`` / ``device`` and injected with
``torch.func.functional_call``, with the model in eval mode (dropout off, BatchNorm on its
running statistics) for the duration of the call and its train/eval flags restored after. The
model itself is never modified. The parameter space is θ of :mod:`curvlake.nn.params`: every
tensor of ``model.named_parameters()``, frozen ones included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from curvlake.errors import UserInputError
from curvlake.nn.params import parameter_table, unflatten

#: Largest default number of examples per vectorised step.
MAX_DEFAULT_BATCH = 256
#: Budget (bytes) for the largest transient per-example gradient block.
CHUNK_BYTES = 256 * 2**20


def check_dtype_device(
    model: nn.Module, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    """Validate the compute dtype; the device defaults to that of the model's parameters."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserInputError(f"dtype={dtype!r} must be a floating torch.dtype (e.g. torch.float32)")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    return dtype, torch.device(device)


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise UserInputError(f"batch_size={batch_size!r} must be a positive int or None")


def resolve_batch_size(batch_size: int | None, n_params: int, dtype: torch.dtype) -> int:
    """Default: as many examples as fit a ~256 MiB ``(batch, P)`` block, between 1 and 256."""
    if batch_size is not None:
        return batch_size
    per_example = max(1, n_params * torch.finfo(dtype).bits // 8)
    return int(max(1, min(MAX_DEFAULT_BATCH, CHUNK_BYTES // per_example)))


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``batch_size`` examples covering ``[0, n)``, in order."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def as_input(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x`` as a detached tensor with a leading example axis of length ``n >= 1``."""
    x = torch.as_tensor(x).detach()
    if x.ndim < 1 or x.shape[0] == 0:
        raise UserInputError(f"x must have a leading example axis with n >= 1, got {x.shape}")
    return x


def cast_input(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Floating inputs go to ``dtype``; integer inputs (token ids) keep theirs."""
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)


def check_logits(logits: torch.Tensor, n: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != n:
        raise UserInputError(
            f"the model must map a batch of {n} examples to logits of shape (n, C); "
            f"got output shape {tuple(logits.shape)}"
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (dropout off, BatchNorm on running stats), then restore flags."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class FunctionalModel:
    """The model's parameters and buffers as ``dtype`` / ``device`` copies for functional_call.

    Attributes:
        model: The module (its forward is called, its tensors are not used).
        table: The layer table of θ (:func:`curvlake.nn.params.parameter_table`).
        n_params: ``P``, the length of θ.
        params: Name -> copy of every parameter (frozen ones included).
        buffers: Name -> copy of every buffer (floating buffers in ``dtype``).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.dtype = dtype
        self.device = device
        self.table = parameter_table(model)
        self.n_params = self.table.total
        if self.n_params == 0:
            raise UserInputError("model has no parameters")
        self.params = {
            name: p.detach().to(device=device, dtype=dtype) for name, p in model.named_parameters()
        }
        self.buffers = {
            name: b.to(device=device, dtype=dtype) if b.is_floating_point() else b.to(device)
            for name, b in model.named_buffers()
        }

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The model's output on ``x`` with ``params`` (default: the copies) and the buffers."""
        tensors = {**self.buffers, **(self.params if params is None else params)}
        return functional_call(self.model, tensors, (x,))

    def forward_flat(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` at the flat parameter vector ``theta`` (length P)."""
        return self.forward(x, unflatten(self.model, theta))
