"""``dsf``: a dataset-level diagonal Fisher (NPEFF's D-DSF)."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec


def _example():
    return {"fisher": np.random.default_rng(0).random(10).astype(np.float32)}, {
        "mode": "expectation",
        "n_examples": 5,
    }


SPEC = ArtifactSpec(
    kind="dsf",
    version="1.1",
    description=(
        "Mean over examples of the diagonal Fisher: `expectation` = mean D-PEF, `sampling` = "
        "mean of (grad log p_y)^2 with y drawn from the model. Not normalized."
    ),
    arrays=(
        ArraySpec(
            "fisher",
            ("param",),
            "float",
            "diagonal Fisher (float32, or float64 with --dtype float64)",
        ),
    ),
    attrs=(
        AttrSpec("mode", "expectation or sampling"),
        AttrSpec("n_examples", "number of examples averaged"),
    ),
    example=_example,
    summary_keys=("mode", "split", "n_examples", "checkpoint"),
)
