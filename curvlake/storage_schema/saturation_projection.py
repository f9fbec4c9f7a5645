"""``saturation_projection``: a model evaluated with its layers projected onto delta eigenspaces."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    deltas = np.array([0.9, 0.99, 3.0])
    arrays = {
        "delta": deltas,
        "layer": np.array(["conv", "fc"], dtype=object),
        "n_features": np.array([4, 3], dtype=np.int64),
        "intrinsic_dimension": np.array([[2, 1], [3, 2], [4, 3]], dtype=np.int64),
        "saturation": np.array([[0.5, 1 / 3], [0.75, 2 / 3], [1.0, 1.0]]),
        "loss": np.array([1.2, 0.6, 0.5]),
        "accuracy": np.array([0.6, 0.8, 0.81]),
        "random_loss": np.array([2.0, 1.0, 0.5]),
        "random_accuracy": np.array([0.2, 0.5, 0.81]),
    }
    attrs = {
        "checkpoint_epoch": 10,
        "split": "test",
        "fit_split": "train",
        "rule": "textbook",
        "conv_method": "channelwise",
        "random": True,
    }
    return arrays, attrs


def _per_delta(name: str, what: str, required: bool = True) -> ArraySpec:
    return ArraySpec(name, ("delta",), "float64", what, required=required, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="saturation_projection",
    version="1.0",
    description=(
        "A checkpoint evaluated with every tracked layer's output x replaced by its projection "
        "mu + (x - mu) V_k V_k^T onto the eigenspace explaining a share `delta` of its variance "
        "(Richter et al. 2021, phd-lab's `infer_with_altering_delta.py`), all layers at once. "
        "Means and eigenvectors come from the unprojected model's outputs on `fit_split`; loss "
        "(mean cross-entropy) and accuracy are over `split`. delta >= 1 keeps every dimension "
        "(the unchanged model). With `random`, the ablation replaces each V_k by a random "
        "orthonormal basis of the same rank."
    ),
    arrays=(
        ArraySpec("delta", ("delta",), "float64", "thresholds", role="coord", chunking=whole_array),
        ArraySpec(
            "layer", ("layer",), "str", "projected layers", role="coord", chunking=whole_array
        ),
        ArraySpec(
            "n_features",
            ("layer",),
            "int64",
            "dimension d of each layer's observations",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "intrinsic_dimension",
            ("delta", "layer"),
            "int64",
            "rank k kept per layer",
            chunking=whole_array,
        ),
        ArraySpec("saturation", ("delta", "layer"), "float64", "k / d", chunking=whole_array),
        _per_delta("loss", "mean cross-entropy with the projections"),
        _per_delta("accuracy", "accuracy with the projections"),
        _per_delta("random_loss", "mean cross-entropy, random projections", required=False),
        _per_delta("random_accuracy", "accuracy, random projections", required=False),
    ),
    attrs=(
        AttrSpec("checkpoint_epoch", "epoch of the evaluated checkpoint"),
        AttrSpec("split", "split evaluated"),
        AttrSpec("fit_split", "split the means and eigenvectors come from"),
        AttrSpec("rule", "textbook or delve"),
        AttrSpec("conv_method", "channelwise, mean, max or flatten"),
        AttrSpec("random", "whether the random ablation was run"),
    ),
    example=_example,
    summary_keys=("checkpoint", "deltas", "random", "split"),
)
