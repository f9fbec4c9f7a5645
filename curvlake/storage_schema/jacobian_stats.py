"""``jacobian_stats``: per-example statistics of runs over checkpoints (dataset statistics)."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array

STAT_NAMES = ("accuracy", "cross_entropy", "confidence", "jacobian_frobenius", "jacobian_operator")

_DESCRIPTIONS = {
    "accuracy": "1 if the prediction equals the (noisy) label, else 0",
    "cross_entropy": "cross-entropy loss against the (noisy) label",
    "confidence": "||softmax(z) - onehot(y)||_2",
    "jacobian_frobenius": "Frobenius norm of the input Jacobian of the normalized output",
    "jacobian_operator": "operator (spectral) norm of the input Jacobian of the normalized output",
}


def _example():
    rng = np.random.default_rng(0)
    runs, checkpoints, n = 2, 3, 5
    arrays = {
        "jacobian_operator": rng.random((runs, checkpoints, n)),
        "run": np.array(["run-0000000000000001", "run-0000000000000002"], dtype=object),
        "checkpoint_epoch": np.array([[0, 5, 10]] * runs, dtype=np.int64),
        "sample_id": np.arange(n, dtype=np.int64),
        "label": rng.integers(0, 3, (runs, n)).astype(np.int64),
        "clean_label": rng.integers(0, 3, n).astype(np.int64),
    }
    attrs = {
        "split": "train",
        "normalization": "none",
        "input_space": "standardized",
        "metrics": ["jacobian_operator"],
        "target_only": False,
    }
    return arrays, attrs


def _stat(name: str) -> ArraySpec:
    return ArraySpec(
        name,
        ("run", "checkpoint", "example"),
        "float",
        _DESCRIPTIONS[name],
        required=False,
        chunking=lambda shape, itemsize, budget: (1, 1, max(1, min(shape[2], 4096))),
    )


SPEC = ArtifactSpec(
    kind="jacobian_stats",
    version="1.0",
    description=(
        "Per-example statistics of one or more runs (e.g. a width sweep) at their checkpoints, "
        "over every example of one split. One variable per statistic, dims (run, checkpoint, "
        "example); `run` has length 1 for a single run. Attributes record the split, the output "
        "normalization, whether only the target row was used, and the input space "
        "(`standardized`: Jacobians with respect to the standardized inputs the model sees; "
        "`raw`: with respect to raw pixels in [0, 1])."
    ),
    arrays=(
        *(_stat(name) for name in STAT_NAMES),
        ArraySpec("run", ("run",), "str", "run artifact ids", role="coord", chunking=whole_array),
        ArraySpec(
            "checkpoint_epoch",
            ("run", "checkpoint"),
            "int64",
            "epoch of each selected checkpoint",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "sample_id",
            ("example",),
            "int64",
            "index of the example in its split source",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "label",
            ("run", "example"),
            "int64",
            "label the run trained on (noisy on the train split)",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "clean_label", ("example",), "int64", "true label", role="coord", chunking=whole_array
        ),
    ),
    attrs=(
        AttrSpec("split", "train, val or test"),
        AttrSpec("normalization", "none, softmax, logsoftmax or crossentropy"),
        AttrSpec("input_space", "standardized or raw"),
        AttrSpec("metrics", "the statistics stored"),
        AttrSpec("target_only", "Jacobian row of the target class only"),
    ),
    example=_example,
    summary_keys=("metrics", "split", "normalization", "checkpoints"),
)
