"""``receptive_field``: analytic receptive fields of a model's layers and its border layer."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    arrays = {
        "layer": np.array(["conv1", "conv2", "fc"], dtype=object),
        "r_min": np.array([[3.0, 3.0], [5.0, 5.0], [np.inf, np.inf]]),
        "r_max": np.array([[3.0, 3.0], [5.0, 5.0], [np.inf, np.inf]]),
        "jump": np.array([[1.0, 1.0], [1.0, 1.0], [np.inf, np.inf]]),
        "start": np.array([[0.5, 0.5], [0.5, 0.5], [2.0, 2.0]]),
        "map_size": np.array([[4, 4], [4, 4], [-1, -1]], dtype=np.int64),
    }
    attrs = {"input_size": [4, 4], "border_layer": "conv2", "border_layer_max": "conv2"}
    return arrays, attrs


def _axis_array(name: str, what: str, dtype="float64") -> ArraySpec:
    return ArraySpec(name, ("layer", "axis"), dtype, what, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="receptive_field",
    version="1.0",
    description=(
        "Receptive fields of a model's feature layers (in module order) per spatial axis, from "
        "the analytic recurrence over the model's torch.fx graph (Araujo et al. 2019): "
        "`r_min` / `r_max` the smallest / largest receptive field over the paths from the "
        "input (they differ with skip connections), `jump` the cumulative stride and `start` "
        "the centre of the first unit's field, in input pixels. Global layers (after global "
        "pooling or flattening) have inf. `border_layer` is the first layer whose `r_min` "
        "covers the input on every axis (Richter et al. 2021; null when none does); layers "
        "after it tend to be unproductive. `border_layer_max` uses `r_max`."
    ),
    arrays=(
        ArraySpec(
            "layer",
            ("layer",),
            "str",
            "layer names, in module order",
            role="coord",
            chunking=whole_array,
        ),
        _axis_array("r_min", "smallest receptive field over the paths"),
        _axis_array("r_max", "largest receptive field (extent of the union of the windows)"),
        _axis_array("jump", "input pixels between neighbouring units"),
        _axis_array("start", "centre of the first unit's field"),
        _axis_array("map_size", "spatial size of the layer's output (-1: flattened)", "int64"),
    ),
    attrs=(
        AttrSpec("input_size", "spatial size of the input"),
        AttrSpec("border_layer", "first layer whose r_min covers the input (null: none)"),
        AttrSpec("border_layer_max", "first layer whose r_max covers the input (null: none)"),
    ),
    example=_example,
    summary_keys=("model", "model_params", "input_size"),
)
