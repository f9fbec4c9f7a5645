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
    "flatten_optimizer_window",
    "flatten_parameters",
    "load_model",
    "optimizer_window_arrays",
    "parameter_table",
    "restore_optimizer_state",
    "restore_optimizer_window",
]


def optimizer_slots(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """Names of the per-parameter state tensors the optimizer keeps."""
    if isinstance(optimizer, torch.optim.SGD):
        momentum = optimizer.param_groups[0].get("momentum", 0)
        return ("momentum_buffer",) if momentum else ()
    if isinstance(optimizer, torch.optim.Adam):
        amsgrad = optimizer.param_groups[0].get("amsgrad", False)
        return ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()))
    if _is_mfac(optimizer):
        momentum = any(group["momentum"] > 0 for group in optimizer.param_groups)
        return ("momentum_buffer",) if momentum else ()
    raise UserInputError(f"optimizer {type(optimizer).__name__} is not supported (sgd, adam, mfac)")


def _is_mfac(optimizer: torch.optim.Optimizer) -> bool:
    from curvlake.pipelines.mfac.optimizer import MFAC

    return isinstance(optimizer, MFAC)


def optimizer_window_arrays(optimizer: torch.optim.Optimizer) -> dict[str, tuple[tuple, str]]:
    """The optimizer state that is not per parameter, as arrays of one checkpoint: name ->
    (shape, dtype) of the run's optional ``mfac_*`` arrays (empty for SGD and Adam).

    M-FAC keeps its window ``(m, d)`` of the last m gradients on the d trained coordinates,
    the Gram matrix and ``K⁻¹`` (m × m, float64) and four counters (``MFAC_STATE_FIELDS`` of
    :mod:`curvlake.storage_schema.run`).
    """
    if not _is_mfac(optimizer):
        return {}
    saved = optimizer.state_dict()["mfac"]
    m, d = int(saved["ngrads"]), int(saved["n_coordinates"])
    window_dtype = str(optimizer.window_dtype).removeprefix("torch.")
    return {
        "mfac_window": ((m, d), window_dtype),
        "mfac_gram": ((m, m), "float64"),
        "mfac_inverse": ((m, m), "float64"),
        "mfac_state": ((4,), "int64"),
    }


def flatten_optimizer_window(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The arrays of :func:`optimizer_window_arrays` at this moment, exactly (before the first
    step: a zero window and Gram matrix; ``K⁻¹`` is NaN until the window is full)."""
    shapes = optimizer_window_arrays(optimizer)
    if not shapes:
        return {}
    saved = optimizer.state_dict()["mfac"]

    def host(tensor: torch.Tensor | None, name: str, fill: float) -> np.ndarray:
        shape, dtype = shapes[name]
        if tensor is None:
            return np.full(shape, fill, dtype=dtype)
        return tensor.detach().to("cpu").numpy().copy()

    return {
        "mfac_window": host(saved["window"], "mfac_window", 0.0),
        "mfac_gram": host(saved["gram"], "mfac_gram", 0.0),
        "mfac_inverse": host(saved["inverse"], "mfac_inverse", np.nan),
        "mfac_state": np.array(
            [saved["count"], saved["slot"], saved["since_refresh"], saved["inverse"] is not None],
            dtype=np.int64,
        ),
    }


def restore_optimizer_window(
    optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray]
) -> None:
    """Inverse of :func:`flatten_optimizer_window` (after :func:`restore_optimizer_state`), so
    that the next steps are bit for bit those of the run that saved it."""
    if not _is_mfac(optimizer):
        return
    state = optimizer.state_dict()
    count, slot, since_refresh, has_inverse = (int(v) for v in arrays["mfac_state"])
    started = count > 0
    state["mfac"] = {
        **state["mfac"],
        "count": count,
        "slot": slot,
        "since_refresh": since_refresh,
        "window": torch.from_numpy(np.array(arrays["mfac_window"])) if started else None,
        "gram": torch.from_numpy(np.array(arrays["mfac_gram"])) if started else None,
        "inverse": torch.from_numpy(np.array(arrays["mfac_inverse"])) if has_inverse else None,
    }
    optimizer.load_state_dict(state)


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
