"""``grad_window``: m loss gradients of a checkpoint (M-FAC's window), chunked by parameters."""

import numpy as np

from curvlake.storage_schema._spec import (
    DEFAULT_CHUNK_BYTES,
    ArraySpec,
    ArtifactSpec,
    AttrSpec,
    rows_within_budget,
    whole_array,
)


def all_rows_column_chunks(
    shape: tuple[int, ...], itemsize: int, budget: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """Chunks of a (grad, param) window: every gradient in every chunk, as many parameter
    columns as fit in ``budget`` bytes (the M-FAC kernels contract over the gradients)."""
    rows, columns = (max(1, int(s)) for s in shape)
    return (rows, max(1, min(columns, budget // (rows * itemsize))))


def _example():
    rng = np.random.default_rng(0)
    m, d, b = 4, 10, 2
    arrays = {
        "gradient": rng.standard_normal((m, d)).astype(np.float32),
        "param_index": np.array([0, 1, 2, 3, 4, 5, 8, 9, 10, 11], dtype=np.int64),
        "sample_id": rng.integers(0, 100, (m, b)).astype(np.int64),
        "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
        "layer_offset": np.array([0, 10], dtype=np.int64),
        "layer_size": np.array([10, 2], dtype=np.int64),
        "layer_shape": np.array(["2,5", "2"], dtype=object),
    }
    attrs = {
        "selection": "mask",
        "run": "run-0123456789abcdef",
        "checkpoint": 1,
        "split": "train",
        "n_grads": m,
        "batch_size": b,
        "order": "shuffled",
        "seed": 0,
        "mask": "mask-0123456789abcdef",
        "n_params": 12,
        "parameter_fingerprint": "0123456789abcdef",
    }
    return arrays, attrs


def _table_array(name: str, dtype: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("layer",), dtype, what, role="coord", chunking=whole_array)


SPEC = ArtifactSpec(
    kind="grad_window",
    version="1.0",
    description=(
        "A gradient window for M-FAC (`curvlake.pipelines.mfac`): `gradient[i]` is the gradient of "
        "the mean cross-entropy over the `batch_size` examples `sample_id[i]` of the run's "
        "checkpoint (eval mode; batch size 1: per-example gradients), in float32 or float64. "
        "Chunks hold every gradient and a range of parameter columns, so the inverse Fisher "
        "`F = damp·I + GᵀG/m` is applied chunk by chunk "
        "(`curvlake.pipelines.mfac.InverseFisher.from_lake`). `selection=all`: column `j` is "
        "coordinate `j` of the run's θ (layer table beside it); `selection=mask`: only the "
        "coordinates of the `mask` artifact, column `j` being θ coordinate `param_index[j]`."
    ),
    arrays=(
        ArraySpec(
            "gradient",
            ("grad", "param"),
            "float",
            "the gradients, one row each; chunks: all rows x a range of columns",
            chunking=all_rows_column_chunks,
        ),
        ArraySpec(
            "param_index",
            ("param",),
            "int64",
            "θ coordinate of each column (selection=mask)",
            variants=("mask",),
            chunking=rows_within_budget,
        ),
        ArraySpec(
            "sample_id",
            ("grad", "batch_example"),
            "int64",
            "index in its split of each example averaged into the gradient",
            chunking=whole_array,
        ),
        _table_array("layer", "str", "parameter tensor names of the run's θ"),
        _table_array("layer_offset", "int64", "offset of the tensor in θ"),
        _table_array("layer_size", "int64", "number of entries of the tensor"),
        _table_array("layer_shape", "str", "tensor shape, comma separated"),
    ),
    attrs=(
        AttrSpec("run", "the run whose checkpoint the gradients are taken at"),
        AttrSpec("checkpoint", "checkpoint index"),
        AttrSpec("split", "data split of the examples"),
        AttrSpec("n_grads", "m, the number of gradients"),
        AttrSpec("batch_size", "b, examples per gradient"),
        AttrSpec("order", "`sequential` (the split in order) or `shuffled` (permuted per pass)"),
        AttrSpec("seed", "seed of the shuffled order (null for sequential)"),
        AttrSpec("mask", "the mask artifact restricting the columns (null: all of θ)"),
        AttrSpec("n_params", "P, the length of the run's θ"),
        AttrSpec("parameter_fingerprint", "fingerprint of the run's layer table"),
    ),
    variant_attr="selection",
    example=_example,
    summary_keys=("checkpoint", "split", "n_grads", "batch_size", "order", "mask", "dtype"),
)
