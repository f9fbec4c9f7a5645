"""``comparison_examples``: NPEFF coefficients against per-example statistics."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    rng = np.random.default_rng(0)
    r, n_top, stats = 2, 3, ("loss", "confidence")
    arrays = {
        "spearman": rng.uniform(-1, 1, (r, len(stats))),
        "pvalue": rng.random((r, len(stats))),
        "statistic": np.array(stats, dtype=object),
        "component": np.array([0, 1], dtype=np.int64),
        "top_example": rng.choice(10, (r, n_top)).astype(np.int64),
        "top_sample_id": rng.choice(100, (r, n_top)).astype(np.int64),
        "top_w": rng.random((r, n_top)),
        "top_value": rng.random((r, n_top, len(stats))),
        "mean_value": rng.random(len(stats)),
    }
    attrs = {
        "npeff": "npeff-0123456789abcdef",
        "pefs": "pefs-0123456789abcdef",
        "jacobian_stats": None,
        "run": "run-0123456789abcdef",
        "checkpoint": 1,
        "split": "train",
        "n_examples": 10,
    }
    return arrays, attrs


SPEC = ArtifactSpec(
    kind="comparison_examples",
    version="1.0",
    description=(
        "NPEFF coefficients against per-example statistics of the same examples (`curvlake "
        "compare examples`). Statistics of the npeff artifact's examples, matched by sample id: "
        "`loss` (cross-entropy of the PEF logits against the label), `confidence` (largest "
        "softmax probability), `pef_norm` (Frobenius norm of the PEF) and, with a "
        "`jacobian_stats` artifact of the same run, checkpoint and split, each of its "
        "statistics (e.g. `jacobian_operator`). `spearman[j, s]` is Spearman's rank correlation "
        "of W[:, j] with statistic s over the examples (`pvalue`: its two-sided p-value, "
        "`scipy.stats.spearmanr`; NaN for a constant column); `top_*` are component j's `top` "
        "examples of largest W[:, j] (rows of W) and their statistics, `mean_value` the mean "
        "over all examples."
    ),
    arrays=(
        ArraySpec(
            "spearman",
            ("component", "statistic"),
            "float64",
            "rank correlation of W[:, j] with the statistic",
            chunking=whole_array,
        ),
        ArraySpec(
            "pvalue",
            ("component", "statistic"),
            "float64",
            "two-sided p-value of the rank correlation",
            chunking=whole_array,
        ),
        ArraySpec(
            "statistic",
            ("statistic",),
            "str",
            "statistic names",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "component",
            ("component",),
            "int64",
            "component index in the npeff artifact",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "top_example",
            ("component", "top"),
            "int64",
            "top examples (rows of W), largest W first",
            chunking=whole_array,
        ),
        ArraySpec(
            "top_sample_id",
            ("component", "top"),
            "int64",
            "sample id of each top example",
            chunking=whole_array,
        ),
        ArraySpec(
            "top_w", ("component", "top"), "float64", "W of each top example", chunking=whole_array
        ),
        ArraySpec(
            "top_value",
            ("component", "top", "statistic"),
            "float64",
            "the statistics of the top examples",
            chunking=whole_array,
        ),
        ArraySpec(
            "mean_value",
            ("statistic",),
            "float64",
            "mean of each statistic over all examples",
            chunking=whole_array,
        ),
    ),
    attrs=(
        AttrSpec("npeff", "the npeff artifact"),
        AttrSpec("pefs", "its pefs artifact"),
        AttrSpec("jacobian_stats", "the jacobian_stats artifact (null: none)"),
        AttrSpec("run", "the run of the examples"),
        AttrSpec("checkpoint", "checkpoint index of the run"),
        AttrSpec("split", "data split of the examples"),
        AttrSpec("n_examples", "examples compared"),
    ),
    example=_example,
    summary_keys=("n_top", "components"),
)
