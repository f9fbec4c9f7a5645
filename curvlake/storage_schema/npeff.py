"""``npeff``: a non-negative factorization of per-example Fishers (D-NPEFF or LRM-NPEFF)."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def column_blocks(shape, itemsize, budget):
    """All components, as many whole columns as fit in the budget (the pipelines' blocks)."""
    return (shape[0], max(1, min(shape[1], budget // max(1, shape[0] * itemsize))))


def _example():
    rng = np.random.default_rng(0)
    n, r, p = 6, 2, 5
    arrays = {
        "W": rng.random((n, r)),
        "H": rng.random((r, p)).astype(np.float32),
        "kept_columns": np.array([0, 2, 3, 7, 9], dtype=np.int64),
        "loss": np.array([0.9, 0.5, 0.4]),
        "seconds": np.array([0.0, 0.1, 0.1]),
        "label": rng.integers(0, 3, n).astype(np.int64),
        "sample_id": np.arange(n, dtype=np.int64),
    }
    attrs = {
        "format": "dense",
        "n_components": r,
        "n_parameters": 10,
        "solver": "hals",
        "converged": False,
        "pefs": "pefs-0000000000000000",
    }
    return arrays, attrs


SPEC = ArtifactSpec(
    kind="npeff",
    version="1.0",
    description=(
        "NPEFF components of a PEF artifact. A ~ W H with A the PEFs normalized to unit row "
        "norm and restricted to the `kept_columns` (parameters with a nonzero entry). "
        "`format=dense`: H dense (component, column); `format=csr`: H sparsified (rows "
        "unit-normalized, scale moved into W, small entries dropped) as CSR arrays "
        "`H_data`, `H_indices` (column), `H_indptr`; `format=lowrank`: LRM-NPEFF, F_i ~ "
        "sum_j W_ij g_j g_j^T with `G` (component, column). `loss[t]` is the true relative "
        "loss after iteration t (t = 0: the initialization): ||A - WH||_F / ||A||_F, for "
        "LRM-NPEFF sqrt(sum_i ||F_i - sum_j W_ij g_j g_j^T||_F^2 / sum_i ||F_i||_F^2), its "
        "full objective (with the orthogonality penalty) in `objective`."
    ),
    arrays=(
        ArraySpec("W", ("example", "component"), "float", "coefficients (non-negative)"),
        ArraySpec(
            "H",
            ("component", "column"),
            "float",
            "components (non-negative)",
            variants=("dense",),
            chunking=column_blocks,
        ),
        ArraySpec(
            "G",
            ("component", "column"),
            "float",
            "LRM-NPEFF component vectors g_j",
            variants=("lowrank",),
            chunking=column_blocks,
        ),
        ArraySpec("H_data", ("nnz",), "float32", "CSR values of the sparse H", variants=("csr",)),
        ArraySpec("H_indices", ("nnz",), "int64", "CSR column of each value", variants=("csr",)),
        ArraySpec(
            "H_indptr",
            ("component_ptr",),
            "int64",
            "CSR row pointers (r + 1)",
            variants=("csr",),
            chunking=whole_array,
        ),
        ArraySpec(
            "kept_columns",
            ("column",),
            "int64",
            "parameter index (into the flat parameter vector) of each column",
            chunking=whole_array,
        ),
        ArraySpec(
            "loss", ("iteration",), "float64", "relative loss per iteration", chunking=whole_array
        ),
        ArraySpec(
            "objective",
            ("iteration",),
            "float64",
            "LRM-NPEFF objective per iteration (data loss + orthogonality penalty)",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "seconds",
            ("iteration",),
            "float64",
            "wall time of each iteration",
            chunking=whole_array,
        ),
        ArraySpec(
            "label",
            ("example",),
            "int64",
            "label of the example",
            role="coord",
            chunking=whole_array,
        ),
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
        AttrSpec("n_components", "r"),
        AttrSpec("n_parameters", "size of the flat parameter vector"),
        AttrSpec("solver", "hals, mu (D-NPEFF) or the LRM optimizer"),
        AttrSpec("converged", "whether the tolerance was reached"),
        AttrSpec("pefs", "the pefs artifact factorized"),
    ),
    variant_attr="format",
    example=_example,
    summary_keys=("n_components", "solver", "format", "max_iter", "threshold"),
)
