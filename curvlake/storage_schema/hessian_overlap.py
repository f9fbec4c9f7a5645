"""``hessian_overlap``: overlap of a parameter mask with a Hessian eigenspace."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    k = 4
    overlap = np.array([0.5, 0.4, 0.3, 0.3])
    arrays = {
        "k_prime": np.arange(1, k + 1, dtype=np.int64),
        "overlap": overlap,
        "iou": overlap / (2 - overlap),
        "nested_overlap": np.array([1.0, 0.5, 0.4, 0.3]),
        "nested_baseline": np.arange(1, k + 1) / 100.0,
        "principal_angles": np.array([0.1, 0.5, 1.0, 1.5]),
    }
    attrs = {
        "eigs": "hessian_eigs-0123456789abcdef",
        "mask": "mask-0123456789abcdef",
        "mask_size": 4,
        "n_params": 100,
        "k": k,
        "baseline": 0.04,
        "run": "run-0123456789abcdef",
        "checkpoint": 0,
        "geodesic": 1.9,
        "chordal": 1.7,
        "chordal_max": 1.4,
        "projection": 1.4,
        "projection_max": 1.0,
        "fubini_study": 1.5,
        "mean_cos2": 0.4,
    }
    return arrays, attrs


def _curve(name: str, what: str, required: bool = True) -> ArraySpec:
    return ArraySpec(name, ("k_prime",), "float64", what, required=required, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="hessian_overlap",
    version="1.0",
    description=(
        "How much of the top Hessian eigenspace lies in a parameter mask M (m coordinates), "
        "Fernandez et al. 2025: `overlap[k'] = ‖U[M, :k']‖²_F / k'` for k' = 1..k (U the "
        "eigenvectors of `eigs`); its random-mask expectation is `baseline` = m / D. `iou` = "
        "overlap / (2 − overlap) is the IoU two masks with that overlap would have. "
        "`nested_overlap` is the seed's curve, where the mask of k' is the top-k' |θ| "
        "(magnitude masks of global scope), with baseline `nested_baseline` = k'/D. "
        "`principal_angles` are those between span E_M and span U (min(m, k) of them), "
        "and the attributes `geodesic`, `chordal`, `chordal_max`, `projection`, "
        "`projection_max`, `fubini_study` and `mean_cos2` are the Grassmannian metrics "
        "from them (curvlake.pipelines.hessian.overlap.grassmann_metrics)."
    ),
    arrays=(
        ArraySpec(
            "k_prime",
            ("k_prime",),
            "int64",
            "number of top eigenvectors k'",
            role="coord",
            chunking=whole_array,
        ),
        _curve("overlap", "‖U[M, :k']‖²_F / k'"),
        _curve("iou", "overlap / (2 − overlap)"),
        _curve("nested_overlap", "‖U[M_k', :k']‖²_F / k' with M_k' the top-k' |θ|", False),
        _curve("nested_baseline", "k' / D, the random baseline of nested_overlap", False),
        ArraySpec(
            "principal_angles",
            ("angle",),
            "float64",
            "principal angles (radians, ascending) between span E_M and span U",
            chunking=whole_array,
        ),
    ),
    attrs=(
        AttrSpec("eigs", "the hessian_eigs artifact"),
        AttrSpec("mask", "the mask artifact"),
        AttrSpec("mask_size", "m, coordinates in the mask"),
        AttrSpec("n_params", "D, the length of θ"),
        AttrSpec("k", "eigenvectors used"),
        AttrSpec("baseline", "m / D, the expected overlap of a random mask"),
        AttrSpec("run", "the run"),
        AttrSpec("checkpoint", "checkpoint index"),
        AttrSpec("geodesic", "‖θ‖₂ of the principal angles"),
        AttrSpec("chordal", "‖2 sin(θ/2)‖₂"),
        AttrSpec("chordal_max", "max 2 sin(θ/2)"),
        AttrSpec("projection", "‖sin θ‖₂"),
        AttrSpec("projection_max", "max sin θ"),
        AttrSpec("fubini_study", "arccos ∏ cos θ"),
        AttrSpec("mean_cos2", "mean cos² θ"),
        AttrSpec("epoch", "training epoch of the checkpoint", required=False),
    ),
    example=_example,
    summary_keys=("mask_source", "mask_size"),
)
