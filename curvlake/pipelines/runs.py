"""Models trained elsewhere into the lake (``runs import``) and back out (``runs export``)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.lake.checkpoints import (
    flatten_buffers,
    flatten_parameters,
    load_model,
    parameter_table,
)
from curvlake.pipelines.train import METRICS, model_tables


def _load_file(path: Path) -> tuple[Any, bytes]:
    if not path.is_file():
        raise UserInputError(f"no such file: {path}")
    blob = path.read_bytes()
    return blob, hashlib.sha256(blob).hexdigest()


def import_run(
    lake: Lake,
    path: str | Path,
    *,
    model: str | None = None,
    model_params: Mapping[str, Any] | None = None,
    num_classes: int,
    input_shape: Sequence[int],
    dataset: str = "unknown",
) -> str:
    """Store a model trained elsewhere as a one-checkpoint ``run`` artifact; return its id.

    Args:
        path: a ``state_dict`` saved with ``torch.save`` (give ``model``, a zoo name, and its
            ``model_params``), or a TorchScript file / pickled ``nn.Module`` (``model=None``;
            a pickled module needs its class importable when loaded).
        num_classes, input_shape: the classifier's outputs and one input's shape.
        dataset: the dataset it was trained on (a name or a dataset artifact id).
    """
    path = Path(path)
    blob, digest = _load_file(path)
    module_format = None
    if model is not None:
        from curvlake.nn.models import build_model

        net = build_model(
            model,
            num_classes=num_classes,
            input_shape=tuple(input_shape),
            **dict(model_params or {}),
        )
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise UserInputError(f"{path} does not hold a state_dict (got {type(state).__name__})")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserInputError(f"{path} does not fit model {model!r}: {error}") from None
    else:
        try:
            net = torch.jit.load(io.BytesIO(blob), map_location="cpu")
            module_format = "torchscript"
        except RuntimeError:
            net = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
            module_format = "pickle"
        if not isinstance(net, torch.nn.Module):
            raise UserInputError(
                f"{path} is neither TorchScript nor a pickled nn.Module; for a state_dict give "
                "--model"
            )
    config = {
        "imported_from": path.name,
        "sha256": digest,
        "model": model or "custom",
        "model_params": dict(model_params or {}),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "dataset": dataset,
    }
    writer = lake.begin("run", config)
    if writer.complete:
        return writer.id
    n_params = parameter_table(net).total
    writer.write("theta", flatten_parameters(net)[None])
    writer.create_array("opt_state", (1, 0, n_params))
    writer.write("opt_slot", np.array([], dtype=object))
    writer.write("opt_step", np.zeros(1, np.int64))
    writer.write("checkpoint_epoch", np.zeros(1, np.int64))
    buffers = flatten_buffers(net)
    if buffers.size:
        writer.write("buffers", buffers[None])
    writer.write_many(model_tables(net))
    writer.write("epoch", np.zeros(1, np.int64))
    for name in METRICS:
        writer.write(name, np.full(1, np.nan))
    if module_format is not None:
        writer.write("module", np.frombuffer(blob, dtype=np.uint8))
    writer.set_attrs(
        model=model or "custom",
        model_params=dict(model_params or {}),
        dataset=dataset,
        num_classes=int(num_classes),
        input_shape=[int(s) for s in input_shape],
        optimizer="none",
        **({"module_format": module_format} if module_format else {}),
    )
    return writer.commit()


def export_state_dict(lake: Lake, run_id: str, path: str | Path, checkpoint: int = -1) -> Path:
    """Write the ``state_dict`` of a run's checkpoint to ``path`` with ``torch.save``."""
    path = Path(path)
    model = load_model(lake, run_id, checkpoint)
    torch.save(model.state_dict(), path)
    return path
