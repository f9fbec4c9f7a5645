"""``comparison_layers``: saturation, probe accuracy and receptive field per layer, over epochs."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    rng = np.random.default_rng(0)
    n_epoch, n_layer = 2, 3
    arrays = {
        "layer": np.array(["conv1", "conv2", "fc"], dtype=object),
        "epoch": np.array([1, 2], dtype=np.int64),
        "saturation": rng.random((n_epoch, n_layer)),
        "probe_accuracy": rng.random((n_epoch, n_layer)),
        "receptive_field_min": np.array([[3.0, 3.0], [5.0, 5.0], [np.nan, np.nan]]),
        "receptive_field_max": np.array([[3.0, 3.0], [5.0, 5.0], [np.nan, np.nan]]),
        "input_size": np.array([4, 4], dtype=np.int64),
    }
    attrs = {
        "run": "run-0123456789abcdef",
        "saturation": "saturation-0123456789abcdef",
        "probes": ["probes-0123456789abcdef"],
        "receptive_field": "receptive_field-0123456789abcdef",
        "border_layer": "conv2",
    }
    return arrays, attrs


def _grid(name: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("epoch", "layer"), "float64", what, chunking=whole_array)


def _field(name: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("layer", "axis"), "float64", what, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="comparison_layers",
    version="1.0",
    description=(
        "PHD-LAB's per-layer quantities of one run on one layer axis (`curvlake compare "
        "layers`): `saturation[e, l]` (intrinsic dimension / width of the layer's features at "
        "epoch e, from a `saturation` artifact), `probe_accuracy[e, l]` (accuracy of the linear "
        "probe on the layer's latents, from a `probes` artifact), and the layer's minimum / "
        "maximum receptive field per spatial axis (from a `receptive_field` artifact); NaN "
        "where an input does not cover a layer or an epoch. `border_layer` is the first layer "
        "whose minimum receptive field covers the input (`input_size`); the layers after it "
        "are the unproductive tail (Richter et al. 2021). Layers are in module order."
    ),
    arrays=(
        ArraySpec("layer", ("layer",), "str", "layer names", role="coord", chunking=whole_array),
        ArraySpec("epoch", ("epoch",), "int64", "epochs", role="coord", chunking=whole_array),
        _grid("saturation", "saturation of the layer at the epoch"),
        _grid("probe_accuracy", "probe accuracy of the layer at the epoch"),
        _field("receptive_field_min", "minimum receptive field over paths (pixels)"),
        _field("receptive_field_max", "maximum receptive field over paths (pixels)"),
        ArraySpec("input_size", ("axis",), "int64", "spatial input size", chunking=whole_array),
    ),
    attrs=(
        AttrSpec("run", "the run"),
        AttrSpec("saturation", "the saturation artifact (null: none)"),
        AttrSpec("probes", "the probes artifacts, one per epoch (empty: none)"),
        AttrSpec("receptive_field", "the receptive_field artifact (null: none)"),
        AttrSpec("border_layer", "first layer whose minimum receptive field covers the input"),
    ),
    example=_example,
    summary_keys=(),
)
