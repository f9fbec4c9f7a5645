"""Receptive fields of a run's (or a zoo model's) layers: ``run_receptive_field``.

The analysis (:func:`~curvlake.pipelines.saturation.receptive_field.receptive_fields`) needs the
architecture and the input shape only, so it runs in the calling process in well under a
second; no Dask tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.lake.checkpoints import build_run_model
from curvlake.nn.hooks import feature_layers
from curvlake.pipelines.saturation.receptive_field import ReceptiveFieldTable, receptive_fields
from curvlake.pipelines.skeleton import POSITIVE_INT, as_lake, require_artifact
from curvlake.validation import IntList, check_exclusive, refuse_unused, validate_params


def table_arrays(table: ReceptiveFieldTable) -> dict[str, np.ndarray]:
    """The artifact's arrays of a receptive-field table (``map_size`` -1 once flattened)."""
    axes = len(table.input_size)
    arrays = table.to_arrays()
    return {
        "layer": np.array(table.names, dtype=object),
        **{name: arrays[name] for name in ("r_min", "r_max", "jump", "start")},
        "map_size": np.array(
            [layer.map_size if layer.map_size else (-1,) * axes for layer in table.layers],
            dtype=np.int64,
        ).reshape(len(table.layers), axes),
    }


@validate_params(
    {
        "input_size": [None, IntList(*POSITIVE_INT)],
        "channels": [None, *POSITIVE_INT],
        "num_classes": [None, *POSITIVE_INT],
    }
)
def run_receptive_field(
    lake: Lake | str,
    run_id: str | None = None,
    *,
    model: str | None = None,
    model_params: Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    channels: int | None = None,
    num_classes: int | None = None,
    layers: str | None = None,
) -> str:
    """Receptive fields of the feature layers of a run's model, or of a zoo model.

    Args:
        lake: the lake (or its URL).
        run_id: a run (its architecture and input shape), or
        model: a model zoo name, with ``model_params``, ``input_size`` (spatial, e.g.
            ``(32, 32)``), ``channels`` (default 3) and ``num_classes`` (default 10).
        layers: regular expression selecting the feature layers (None: all).

    Returns:
        The ``receptive_field`` artifact id.
    """
    from curvlake.nn.models import build_model

    lake = as_lake(lake)
    check_exclusive(run_id=run_id, model=model)
    if run_id is not None:
        refuse_unused(
            "with a run (its model and input shape are the run's)",
            model_params=model_params,
            input_size=input_size,
            channels=channels,
            num_classes=num_classes,
        )
        require_artifact(lake, run_id, "run", role="run")
        network = build_run_model(lake, run_id)
        input_shape = tuple(int(s) for s in lake.group(run_id).attrs["input_shape"])
        config: dict[str, Any] = {"layers": layers}
        inputs = [run_id]
        described = {"model": lake.group(run_id).attrs.get("model")}
    else:
        if input_size is None:
            raise UserInputError("give --input-size H,W with --model (the input's spatial size)")
        input_shape = (channels or 3, *(int(s) for s in input_size))
        params = dict(model_params or {})
        network = build_model(
            model, num_classes=num_classes or 10, input_shape=input_shape, **params
        )
        config = {
            "model": model,
            "model_params": params,
            "input_shape": list(input_shape),
            "num_classes": num_classes or 10,
            "layers": layers,
        }
        inputs = []
        described = {"model": model, "model_params": params}
    if len(input_shape) < 2:
        raise UserInputError(
            f"input shape {input_shape} has no spatial axes; receptive fields need images or "
            "sequences"
        )
    names = [name for name, _ in feature_layers(network, layers)]
    table = receptive_fields(network, input_shape, layers=names)
    writer = lake.begin("receptive_field", config, inputs)
    if writer.complete:
        return writer.id
    with writer:
        writer.write_many(table_arrays(table))
        writer.set_attrs(
            input_size=list(table.input_size),
            input_shape=list(input_shape),
            border_layer=table.border_layer("min"),
            border_layer_max=table.border_layer("max"),
            layers_pattern=layers,
            **described,
        )
    return writer.commit()
