"""``comparison_drift``: principal angles between Hessian eigenspaces of two checkpoints."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array

#: The Grassmannian metrics stored per pair (``curvlake.pipelines.hessian.overlap``).
METRICS = (
    "geodesic",
    "chordal",
    "chordal_max",
    "projection",
    "projection_max",
    "fubini_study",
    "mean_cos2",
)


def _example():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.random((2, 3)) * np.pi / 2, axis=1)
    arrays = {
        "angle": angles,
        "distance": rng.random((2, len(METRICS))),
        "metric": np.array(METRICS, dtype=object),
        "baseline_mean_cos2": np.array([0.3, 0.3]),
        "first": np.array(["hessian_eigs-0000000000000001"] * 2, dtype=object),
        "second": np.array(
            ["hessian_eigs-0000000000000002", "hessian_eigs-0000000000000003"], dtype=object
        ),
        "first_run": np.array(["run-0123456789abcdef"] * 2, dtype=object),
        "second_run": np.array(["run-0123456789abcdef"] * 2, dtype=object),
        "first_epoch": np.array([0, 0], dtype=np.int64),
        "second_epoch": np.array([5, 10], dtype=np.int64),
        "pair": np.arange(2, dtype=np.int64),
    }
    attrs = {"mode": "reference", "k": 3, "n_params": 10, "parameter_fingerprint": "0123"}
    return arrays, attrs


def _per_pair(name: str, dtype: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("pair",), dtype, what, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="comparison_drift",
    version="1.0",
    description=(
        "Drift of Hessian eigenspaces over training (`curvlake compare drift`): for each pair of "
        "`hessian_eigs` artifacts of one parameter space (checkpoints of a run, or two runs of "
        "one architecture), the principal angles 0 <= θ_1 <= ... <= θ_p <= π/2 between the spans "
        "of their top-k eigenvectors (cos θ_i: the singular values of U_1ᵀ U_2, p = k) and the "
        "Grassmannian distances from them (`metric`: geodesic ||θ||, chordal ||2 sin(θ/2)||, "
        "projection ||sin θ||, Fubini-Study arccos Π cos θ_i, mean cos² θ). "
        "`baseline_mean_cos2` = k / P is the expected mean cos² against a uniformly random "
        "k-dimensional subspace. `mode=consecutive`: pairs (0, 1), (1, 2), ... in the given "
        "order; `mode=reference`: (0, 1), (0, 2), ... Epochs are the checkpoints' (-1: unknown)."
    ),
    arrays=(
        ArraySpec(
            "angle",
            ("pair", "angle"),
            "float64",
            "principal angles (radians), ascending",
            chunking=whole_array,
        ),
        ArraySpec(
            "distance",
            ("pair", "metric"),
            "float64",
            "Grassmannian metrics from the angles",
            chunking=whole_array,
        ),
        ArraySpec("metric", ("metric",), "str", "metric names", role="coord", chunking=whole_array),
        _per_pair("baseline_mean_cos2", "float64", "k / P: mean cos² of a random subspace"),
        _per_pair("first", "str", "first hessian_eigs artifact of the pair"),
        _per_pair("second", "str", "second hessian_eigs artifact of the pair"),
        _per_pair("first_run", "str", "run of the first"),
        _per_pair("second_run", "str", "run of the second"),
        _per_pair("first_epoch", "int64", "epoch of the first's checkpoint"),
        _per_pair("second_epoch", "int64", "epoch of the second's checkpoint"),
        ArraySpec("pair", ("pair",), "int64", "pair index", role="coord", chunking=whole_array),
    ),
    attrs=(
        AttrSpec("mode", "`consecutive` or `reference`"),
        AttrSpec("k", "eigenvectors compared per artifact (the leading k of each)"),
        AttrSpec("n_params", "P, the length of θ"),
        AttrSpec("parameter_fingerprint", "fingerprint of the shared layer table"),
    ),
    example=_example,
    summary_keys=("mode", "k"),
)
