"""Checkpoints <-> torch: flat parameter vectors, layer tables, buffers and optimizer state.

A checkpoint is stored as ``theta`` — the flat parameter vector of :mod:`curvlake.nn.params`,
in the parameters' dtype — plus, for models with buffers (BatchNorm running
statistics), ``buffers`` in float64 (exact for float32 statistics and integer counters alike),
and the optimizer's per-parameter state flattened the same way. The layer table says where each
tensor lives in the flat vector, so no 11M-entry index is ever needed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from curvlake.errors import UserInputError
from curvlake.nn.params import (
    LayerTable,
    assign_buffers,
    assign_parameters,
    buffer_table,
    flatten_buffers,
    flatten_parameters,
    parameter_table,
)

__all__ = [
    "LayerTable",
    "assign_buffers",
    "assign_parameters",
    "buffer_table",
    "flatten_buffers",
    "flatten_optimizer_state",
    "flatten_parameters",
    "load_model",
    "parameter_table",
    "restore_optimizer_state",
]


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

    The model is on the CPU, in eval mode, with the stored parameters and buffers bit-exact
    (a float64 run's model is float64).
    """
    group = lake.group(run_id)
    index = _checkpoint_index(group["theta"].shape[0], checkpoint, run_id)
    model = build_run_model(lake, run_id)
    if group["theta"].dtype == np.float64:
        model = model.double()  # a float64 run keeps its precision
    assign_parameters(model, group["theta"][index])
    if "buffers" in group.array_keys():
        assign_buffers(model, group["buffers"][index])
    return model.eval()
