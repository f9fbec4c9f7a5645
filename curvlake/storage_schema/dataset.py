"""``dataset``: user data imported into the lake (``curvlake data import``)."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.standard_normal((12, 4)).astype(np.float32),
        "y": rng.integers(0, 3, 12).astype(np.int64),
        "split": np.array(["train"] * 8 + ["val"] * 2 + ["test"] * 2, dtype=object),
        "sample_id": np.arange(12, dtype=np.int64),
    }
    return arrays, {"input_shape": [4], "num_classes": 3, "name": "example"}


SPEC = ArtifactSpec(
    kind="dataset",
    version="1.0",
    description=(
        "Inputs and integer labels brought by a user. Inputs are stored flattened, "
        "one row per example; `input_shape` restores them."
    ),
    arrays=(
        ArraySpec("x", ("example", "feature"), "float32", "inputs, flattened per example"),
        ArraySpec("y", ("example",), "int64", "integer class label", chunking=whole_array),
        ArraySpec(
            "split", ("example",), "str", "train, val or test", role="coord", chunking=whole_array
        ),
        ArraySpec(
            "sample_id",
            ("example",),
            "int64",
            "index of the example in the imported file",
            role="coord",
            chunking=whole_array,
        ),
    ),
    attrs=(
        AttrSpec("input_shape", "shape of one input, e.g. [1, 28, 28]"),
        AttrSpec("num_classes", "number of classes"),
        AttrSpec("name", "the user's name for the data"),
    ),
    example=_example,
)
