"""``saturation``: per-layer covariance spectra, intrinsic dimension and saturation over epochs."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array

#: the variants (``source`` attribute) that carry spectra, not only saturation values.
_SPECTRA = ("training", "checkpoints")


def _example():
    rng = np.random.default_rng(0)
    epochs, phases, widths = 2, 2, (3, 2)
    eigen = rng.random((epochs, phases, sum(widths)))
    arrays = {
        "epoch": np.array([1, 2], dtype=np.int64),
        "phase": np.array(["train", "eval"], dtype=object),
        "layer": np.array(["conv", "fc"], dtype=object),
        "n_features": np.array(widths, dtype=np.int64),
        "eigen_offset": np.array([0, 3], dtype=np.int64),
        "eigenvalue": eigen,
        "intrinsic_dimension": np.ones((epochs, phases, 2), dtype=np.int64),
        "saturation": np.full((epochs, phases, 2), 0.4),
        "trace": rng.random((epochs, phases, 2)),
        "n_samples": np.full((epochs, phases, 2), 64, dtype=np.int64),
    }
    attrs = {
        "source": "training",
        "delta": 0.99,
        "rule": "textbook",
        "ddof": 0,
        "conv_method": "channelwise",
        "eval_split": "test",
    }
    return arrays, attrs


def _stat(name: str, dtype, what: str, variants=None) -> ArraySpec:
    return ArraySpec(
        name, ("epoch", "phase", "layer"), dtype, what, chunking=whole_array, variants=variants
    )


SPEC = ArtifactSpec(
    kind="saturation",
    version="1.0",
    description=(
        "Saturation of a model's feature layers (Richter et al. 2021): for each epoch, phase and "
        "layer, the eigenvalues of the covariance of the layer's outputs (a conv output is a "
        "matrix of observations by `conv_method`), the intrinsic dimension k (the smallest "
        "eigenspace explaining a share `delta` of the variance under `rule`: `textbook` "
        "min{k : p_k >= delta}, `delve` delve 0.1.50's count = k - 1), the saturation k / d and "
        "the trace. `source` says where it comes from: `training` (`curvlake train --track "
        "saturation`: phase `train` = the training forwards of the epoch, phase `eval` = the "
        "pass over `eval_split` after it; `epoch` e is training epoch e, 1-based), "
        "`checkpoints` (`curvlake saturation compute`: phase `eval` = the pass over "
        "`eval_split` in eval mode; `epoch` is the checkpoint's epoch, `checkpoint` its index) "
        "or `phdlab` (imported per-epoch CSV logs: saturation and intrinsic dimension only). "
        "Eigenvalues of all layers are concatenated along `eigen` (layer l at "
        "`eigen_offset[l]` to `eigen_offset[l] + n_features[l]`), descending, scaled by "
        "1 / (n - ddof)."
    ),
    arrays=(
        ArraySpec(
            "epoch", ("epoch",), "int64", "epoch of each row", role="coord", chunking=whole_array
        ),
        ArraySpec("phase", ("phase",), "str", "train or eval", role="coord", chunking=whole_array),
        ArraySpec(
            "layer",
            ("layer",),
            "str",
            "feature layer names, in module order",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "checkpoint",
            ("epoch",),
            "int64",
            "checkpoint index of each row (source `checkpoints`)",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "n_features",
            ("layer",),
            "int64",
            "dimension d of each layer's observations",
            role="coord",
            chunking=whole_array,
            variants=_SPECTRA,
        ),
        ArraySpec(
            "eigen_offset",
            ("layer",),
            "int64",
            "offset of each layer's eigenvalues along `eigen`",
            role="coord",
            chunking=whole_array,
            variants=_SPECTRA,
        ),
        ArraySpec(
            "eigenvalue",
            ("epoch", "phase", "eigen"),
            "float64",
            "covariance eigenvalues, descending, negatives from rounding set to 0",
            chunking=whole_array,
            variants=_SPECTRA,
        ),
        _stat("intrinsic_dimension", "int64", "k under `rule` at `delta`"),
        _stat("saturation", "float64", "k / d"),
        _stat("trace", "float64", "trace of the covariance (total variance)", _SPECTRA),
        _stat("n_samples", "int64", "observations n the covariance was computed from", _SPECTRA),
    ),
    attrs=(
        AttrSpec("source", "training, checkpoints or phdlab"),
        AttrSpec("delta", "explained-variance threshold"),
        AttrSpec("rule", "textbook or delve"),
        AttrSpec("ddof", "the covariance divides the centred scatter by n - ddof"),
        AttrSpec("conv_method", "channelwise, mean, max or flatten"),
        AttrSpec("eval_split", "split of the eval phase"),
    ),
    variant_attr="source",
    example=_example,
    summary_keys=("source", "delta", "rule", "conv_method", "eval_split", "checkpoints"),
)
