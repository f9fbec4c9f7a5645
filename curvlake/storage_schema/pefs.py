"""``pefs``: per-example Fishers (NPEFF), sparse top-k or dense."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    rng = np.random.default_rng(0)
    n, k, c = 6, 3, 4
    arrays = {
        "values": rng.random((n, k)).astype(np.float32),
        "indices": np.sort(rng.choice(20, (n, k)), axis=1).astype(np.int64),
        "dense_norm": rng.random(n).astype(np.float32) + 1,
        "logits": rng.standard_normal((n, c)).astype(np.float32),
        "label": rng.integers(0, c, n).astype(np.int64),
        "sample_id": np.arange(n, dtype=np.int64),
    }
    attrs = {"pef_kind": "diag", "storage": "topk", "n_parameters": 20, "num_classes": c}
    return arrays, attrs


SPEC = ArtifactSpec(
    kind="pefs",
    version="1.1",
    description=(
        "Per-example Fishers of one checkpoint. `storage=topk`: the k largest entries per example "
        "(`values`, `indices` into the flat parameter vector, sorted by index; for low-rank PEFs "
        "`class_index` says which column of A each value belongs to) and the norm of the "
        "dense PEF. "
        "`storage=dense`: `dense` is the full (example, param) D-PEF matrix; "
        "`storage=dense_factors`: `factors` holds the low-rank factors (small models). Floats "
        "are float32, or float64 when computed with `--dtype float64`."
    ),
    arrays=(
        ArraySpec("values", ("example", "k"), "float", "stored PEF entries", variants=("topk",)),
        ArraySpec(
            "indices", ("example", "k"), "int", "parameter index of each entry", variants=("topk",)
        ),
        ArraySpec(
            "class_index",
            ("example", "k"),
            "int",
            "class (column of A) of each entry",
            required=False,
        ),
        ArraySpec(
            "dense", ("example", "param"), "float", "the dense PEF matrix", variants=("dense",)
        ),
        ArraySpec(
            "factors",
            ("example", "factor_row", "param"),
            "float",
            "low-rank factor A_i per example: rows sqrt(p_c) grad log p_c (lvrm: the first "
            "`rank` rows; the rest are zero)",
            variants=("dense_factors",),
        ),
        ArraySpec(
            "dense_norm",
            ("example",),
            "float",
            "Frobenius norm of the full dense PEF",
            chunking=whole_array,
        ),
        ArraySpec(
            "rank",
            ("example",),
            "int64",
            "per-example rank (lvrm)",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec("logits", ("example", "class"), "float", "model logits"),
        ArraySpec("label", ("example",), "int64", "label", role="coord", chunking=whole_array),
        ArraySpec(
            "sample_id",
            ("example",),
            "int64",
            "index of the example in its split",
            role="coord",
            chunking=whole_array,
        ),
    ),
    attrs=(
        AttrSpec("pef_kind", "diag, lowrank or lvrm"),
        AttrSpec("n_parameters", "size of the flat parameter vector"),
        AttrSpec("num_classes", "number of classes"),
    ),
    variant_attr="storage",
    example=_example,
    summary_keys=(
        "pef_kind",
        "storage",
        "k",
        "split",
        "n_examples",
        "checkpoint",
        "incorrect_only",
    ),
)
