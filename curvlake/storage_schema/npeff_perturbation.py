"""``npeff_perturbation``: KL of the model's predictions when moving along NPEFF components."""

import numpy as np

from curvlake.storage_schema._spec import (
    ArraySpec,
    ArtifactSpec,
    AttrSpec,
    one_row_per_chunk,
    whole_array,
)


def _example():
    rng = np.random.default_rng(0)
    r, n_top, n_baseline = 3, 2, 4
    kl_top = rng.random((r, 2)) + 1
    kl_baseline = rng.random((r, 2)) / 10
    arrays = {
        "kl_top": kl_top,
        "kl_baseline": kl_baseline,
        "kl_ratio": kl_top / kl_baseline,
        "accuracy_top": rng.random((r, 2)),
        "accuracy_baseline": rng.random((r, 2)),
        "accuracy_top_original": rng.random(r),
        "accuracy_baseline_original": rng.random(r),
        "top_example": rng.choice(20, (r, n_top)).astype(np.int64),
        "baseline_example": rng.choice(20, (r, n_baseline)).astype(np.int64),
        "component": np.array([0, 2, 5], dtype=np.int64),
        "sign": np.array([1, -1], dtype=np.int64),
    }
    attrs = {
        "npeff": "npeff-0000000000000000",
        "pefs": "pefs-0000000000000000",
        "run": "run-0000000000000000",
        "checkpoint": 1,
        "split": "train",
        "epsilon": 0.1,
        "n_top": n_top,
        "n_baseline": n_baseline,
        "seed": 0,
        "dtype": "float64",
    }
    return arrays, attrs


def _per_component(name: str, dims: tuple[str, ...], dtype: str, what: str) -> ArraySpec:
    # One chunk row per component: the task of component j owns row j of every array.
    return ArraySpec(name, ("component", *dims), dtype, what, chunking=one_row_per_chunk)


SPEC = ArtifactSpec(
    kind="npeff_perturbation",
    version="1.0",
    description=(
        "Perturbation test of NPEFF components (Matena & Raffel, arXiv 2310.04649, Sec. 4). "
        "For component j the direction d_j is its row of H (G for LRM-NPEFF, the CSR row for "
        "sparse H) scattered to the flat parameter vector through `kept_columns` (zero "
        "elsewhere) and normalized to unit L2 norm; the run's checkpoint is moved to "
        "theta + sign * epsilon * d_j. `kl_*` is the mean over examples of "
        "KL(p_theta || p_perturbed), over the component's `n_top` examples of largest W[:, j] "
        "(`top_example`) and over `n_baseline` other examples drawn at random "
        "(`baseline_example`, disjoint from the top ones); `kl_ratio` = kl_top / kl_baseline "
        "(inf when only the baseline KL is 0, NaN when both are). Example positions are rows "
        "of the npeff artifact's W. Accuracies are against the PEF labels."
    ),
    arrays=(
        _per_component("kl_top", ("sign",), "float64", "mean KL over the top examples"),
        _per_component("kl_baseline", ("sign",), "float64", "mean KL over the baseline"),
        _per_component("kl_ratio", ("sign",), "float64", "kl_top / kl_baseline"),
        _per_component(
            "accuracy_top", ("sign",), "float64", "accuracy of the perturbed model, top examples"
        ),
        _per_component(
            "accuracy_baseline", ("sign",), "float64", "accuracy of the perturbed model, baseline"
        ),
        _per_component(
            "accuracy_top_original", (), "float64", "accuracy of the original model, top examples"
        ),
        _per_component(
            "accuracy_baseline_original", (), "float64", "accuracy of the original model, baseline"
        ),
        _per_component(
            "top_example", ("top",), "int64", "example positions (rows of W) of the top examples"
        ),
        _per_component(
            "baseline_example", ("baseline",), "int64", "example positions of the baseline"
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
            "n_projected",
            ("component",),
            "int64",
            "with max_abs_cos: other components with a non-zero coefficient in the direction",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "sign",
            ("sign",),
            "int64",
            "direction of the move: +1 or -1",
            role="coord",
            chunking=whole_array,
        ),
    ),
    attrs=(
        AttrSpec("npeff", "the npeff artifact whose components are tested"),
        AttrSpec("pefs", "its pefs artifact (examples, labels)"),
        AttrSpec("run", "the run whose checkpoint is perturbed"),
        AttrSpec("checkpoint", "checkpoint index of the run"),
        AttrSpec("split", "data split of the examples"),
        AttrSpec("epsilon", "L2 norm of the parameter move"),
        AttrSpec("n_top", "top examples per component"),
        AttrSpec("n_baseline", "baseline examples per component"),
        AttrSpec("seed", "seed of the baseline draw (per component: rng([seed, j]))"),
        AttrSpec("dtype", "float dtype of the forward passes", required=False),
        AttrSpec(
            "max_abs_cos",
            "null, or: each direction is the part of h_j orthogonal to the span of the other "
            "components whose absolute cosine with it is <= max_abs_cos, renormalized",
            required=False,
        ),
    ),
    example=_example,
    summary_keys=("epsilon", "n_top", "n_baseline", "seed", "components"),
)
