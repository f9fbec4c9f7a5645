"""Checkpoints <-> torch: flat parameter vectors, layer tables, buffers and optimizer state.

A checkpoint is stored as ``theta`` — every parameter of ``model.named_parameters()``
flattened and concatenated, in float32 — plus, for models with buffers (BatchNorm running
statistics), ``buffers`` in float64 (exact for float32 statistics and integer counters alike),
and the optimizer's per-parameter state flattened the same way. The layer table says where each
tensor lives in the flat vector, so no 11M-entry index is ever needed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from curvlake.errors import UserInputError


@dataclass(frozen=True)
class LayerTable:
    """Where each named tensor lives in a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ()

    @property
    def sizes(self) -> np.ndarray:
        return np.array([int(np.prod(s, dtype=np.int64)) for s in self.shapes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def shape_strings(self) -> np.ndarray:
        return np.array([",".join(map(str, s)) for s in self.shapes], dtype=object)

    @classmethod
    def from_strings(cls, names, shapes, dtypes=()) -> LayerTable:
        parsed = tuple(tuple(int(v) for v in str(s).split(",") if v != "") for s in shapes)
        return cls(tuple(str(n) for n in names), parsed, tuple(str(d) for d in dtypes))


def parameter_table(model: torch.nn.Module) -> LayerTable:
    """Layer table of ``model.named_parameters()``."""
    named = list(model.named_parameters())
    return LayerTable(
        tuple(n for n, _ in named),
        tuple(tuple(p.shape) for _, p in named),
        tuple(str(p.dtype).removeprefix("torch.") for _, p in named),
    )


def buffer_table(model: torch.nn.Module) -> LayerTable:
    """Layer table of ``model.named_buffers()`` (BatchNorm statistics and counters)."""
    named = list(model.named_buffers())
    return LayerTable(
        tuple(n for n, _ in named),
        tuple(tuple(b.shape) for _, b in named),
        tuple(str(b.dtype).removeprefix("torch.") for _, b in named),
    )


def flatten_parameters(model: torch.nn.Module) -> np.ndarray:
    """``theta``: all parameters, flattened and concatenated in float32."""
    with torch.no_grad():
        parts = [p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()]
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


def flatten_buffers(model: torch.nn.Module) -> np.ndarray:
    """All buffers, flattened and concatenated in float64."""
    parts = [b.detach().reshape(-1).to("cpu", torch.float64) for b in model.buffers()]
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float64)


def _check_length(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise UserInputError(f"{what} has {got} entries but the model needs {expected}")


def assign_parameters(model: torch.nn.Module, theta: np.ndarray) -> None:
    """Copy a flat float32 vector into the parameters of ``model`` (in place)."""
    table = parameter_table(model)
    _check_length("theta", int(np.asarray(theta).size), table.total)
    flat = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))
    with torch.no_grad():
        for param, offset, size in zip(model.parameters(), table.offsets, table.sizes, strict=True):
            chunk = flat[offset : offset + size].view(param.shape)
            param.copy_(chunk.to(param.dtype))


def assign_buffers(model: torch.nn.Module, values: np.ndarray) -> None:
    """Copy flat float64 buffer values back into the buffers of ``model`` (in place)."""
    table = buffer_table(model)
    _check_length("buffers", int(np.asarray(values).size), table.total)
    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    with torch.no_grad():
        for buf, offset, size in zip(model.buffers(), table.offsets, table.sizes, strict=True):
            buf.copy_(flat[offset : offset + size].view(buf.shape).to(buf.dtype))


def optimizer_slots(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """Names of the per-parameter state tensors the optimizer keeps."""
    if isinstance(optimizer, torch.optim.SGD):
        momentum = optimizer.param_groups[0].get("momentum", 0)
        return ("momentum_buffer",) if momentum else ()
    if isinstance(optimizer, torch.optim.Adam):
        amsgrad = optimizer.param_groups[0].get("amsgrad", False)
        return ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()))
    raise UserInputError(f"optimizer {type(optimizer).__name__} is not supported (sgd, adam)")


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> np.ndarray:
    """Optimizer state as a ``(slots, param)`` float32 array.

    A slot not yet created (before the first step) is stored as zeros, which is what torch's
    SGD and Adam use to initialize it. The number of steps taken is stored beside it by the
    caller (SGD does not record it).
    """
    params = _ordered_params(optimizer)
    slots = optimizer_slots(optimizer)
    total = sum(p.numel() for p in params)
    out = np.zeros((len(slots), total), np.float32)
    offset = 0
    for param in params:
        state = optimizer.state.get(param, {})
        for i, slot in enumerate(slots):
            if state.get(slot) is not None:
                out[i, offset : offset + param.numel()] = (
                    state[slot].detach().reshape(-1).to("cpu", torch.float32).numpy()
                )
        offset += param.numel()
    return out


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer, values: np.ndarray, step: int
) -> None:
    """Inverse of :func:`flatten_optimizer_state`; ``step`` is the number of steps taken
    (nothing to restore before the first step)."""
    if step == 0:
        optimizer.state.clear()
        return
    slots = optimizer_slots(optimizer)
    offset = 0
    for param in _ordered_params(optimizer):
        state = {}
        for i, slot in enumerate(slots):
            flat = torch.from_numpy(np.array(values[i, offset : offset + param.numel()]))
            state[slot] = flat.view(param.shape).to(param.device, param.dtype)
        if isinstance(optimizer, torch.optim.Adam):
            state["step"] = torch.tensor(float(step))
        optimizer.state[param] = state
        offset += param.numel()


# -- models in and out of the lake ---------------------------------------------------------------


def _checkpoint_index(n_checkpoints: int, checkpoint: int, run_id: str) -> int:
    if not -n_checkpoints <= checkpoint < n_checkpoints:
        raise UserInputError(
            f"run {run_id} has {n_checkpoints} checkpoints (0..{n_checkpoints - 1}, or negative "
            f"from the end); got checkpoint={checkpoint}"
        )
    return checkpoint % n_checkpoints


def build_run_model(lake, run_id: str) -> torch.nn.Module:
    """The architecture of a run (zoo model from its config, or the stored custom module)."""
    group = lake.group(run_id)
    if group.attrs.get("curvlake:kind") != "run":
        kind = group.attrs.get("curvlake:kind")
        raise UserInputError(f"{run_id} is a {kind} artifact, not a run")
    if "module" in group.array_keys():
        import io

        blob = io.BytesIO(np.asarray(group["module"][:], dtype=np.uint8).tobytes())
        if group.attrs.get("module_format") == "torchscript":
            return torch.jit.load(blob, map_location="cpu")
        return torch.load(blob, map_location="cpu", weights_only=False)
    from curvlake.nn.models import build_model

    attrs = group.attrs
    params = attrs.get("model_params", {})
    return build_model(
        attrs["model"],
        num_classes=int(attrs["num_classes"]),
        input_shape=tuple(attrs["input_shape"]),
        **params,
    )


@functools.lru_cache(maxsize=4)
def cached_model(
    lake_url: str, run_id: str, checkpoint: int, dtype: str = "float32", device: str = "cpu"
) -> torch.nn.Module:
    """``load_model`` once per process (pipeline tasks), in ``dtype`` on ``device``.

    The module is shared by every task of the process: callers must not modify it.
    """
    from curvlake.lake._lake import open_lake

    model = load_model(open_lake(lake_url), run_id, checkpoint)
    return model.to(device=device, dtype=getattr(torch, dtype))


def load_model(lake, run_id: str, checkpoint: int = -1) -> torch.nn.Module:
    """The model of ``run_id`` at ``checkpoint`` (an index into its checkpoints; -1 = last).

    The model is on the CPU, in eval mode, with the stored parameters and buffers bit-exact.
    """
    group = lake.group(run_id)
    index = _checkpoint_index(group["theta"].shape[0], checkpoint, run_id)
    model = build_run_model(lake, run_id)
    assign_parameters(model, group["theta"][index])
    if "buffers" in group.array_keys():
        assign_buffers(model, group["buffers"][index])
    return model.eval()
