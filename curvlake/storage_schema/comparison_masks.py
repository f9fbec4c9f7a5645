"""``comparison_masks``: overlap of parameter masks with a Hessian top-k eigenspace."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    k, n_masks, n_params = 3, 2, 10
    rng = np.random.default_rng(0)
    arrays = {
        "overlap": rng.random((n_masks, k)),
        "baseline": np.array([0.4, 0.2]),
        "mask_size": np.array([4, 2], dtype=np.int64),
        "mask": np.array(["mask-0123456789abcdef", "npeff-0123456789abcdef:0"], dtype=object),
        "mask_artifact": np.array(
            ["mask-0123456789abcdef", "npeff-0123456789abcdef"], dtype=object
        ),
        "mask_source": np.array(["magnitude", "npeff"], dtype=object),
        "sparsity": 1 - np.array([4, 2]) / n_params,
        "k": np.arange(1, k + 1, dtype=np.int64),
        "eigenvalue": np.array([3.0, 2.0, 1.0]),
    }
    attrs = {
        "hessian_eigs": "hessian_eigs-0123456789abcdef",
        "run": "run-0123456789abcdef",
        "checkpoint": 1,
        "n_params": n_params,
        "parameter_fingerprint": "0123456789abcdef",
    }
    return arrays, attrs


def _per_mask(name: str, dtype: str, what: str, role: str = "data") -> ArraySpec:
    return ArraySpec(name, ("mask",), dtype, what, role=role, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="comparison_masks",
    version="1.0",
    description=(
        "Masks against a Hessian eigenspace (`curvlake compare masks-eigenspace`). For each mask "
        "M (a set of m coordinates of θ: a `mask` artifact, e.g. an M-FAC/OBS or magnitude "
        "pruning mask of one sparsity, or the top parameters of an NPEFF component) and the "
        "orthonormal top-k eigenvectors U (P x k, by |λ| descending) of a `hessian_eigs` "
        "artifact of the same run, checkpoint and parameter space: `overlap[M, k'-1]` = "
        "||U[M, :k']||_F² / k' for k' = 1..k (`curvlake.pipelines.hessian.overlap`), against "
        "`baseline[M]` = m / P, the expected overlap of a uniformly random mask of the same "
        "size (or of a Haar-random U)."
    ),
    arrays=(
        ArraySpec(
            "overlap", ("mask", "k"), "float64", "overlap(k') for k' = 1..k", chunking=whole_array
        ),
        _per_mask("baseline", "float64", "expected overlap of a random mask of the same size"),
        _per_mask("mask_size", "int64", "m, coordinates in the mask"),
        _per_mask("mask", "str", "the mask: artifact id, `:j` for component j", role="coord"),
        _per_mask("mask_artifact", "str", "the artifact the mask comes from"),
        _per_mask("mask_source", "str", "what the mask is: its `source`, or `npeff`"),
        _per_mask("sparsity", "float64", "1 - m / P"),
        ArraySpec("k", ("k",), "int64", "k' = 1..k", role="coord", chunking=whole_array),
        ArraySpec("eigenvalue", ("k",), "float64", "the eigenvalues λ", chunking=whole_array),
    ),
    attrs=(
        AttrSpec("hessian_eigs", "the eigenspace artifact"),
        AttrSpec("run", "the run whose parameter space both index"),
        AttrSpec("checkpoint", "checkpoint index of the run"),
        AttrSpec("n_params", "P, the length of θ"),
        AttrSpec("parameter_fingerprint", "fingerprint of the layer table"),
    ),
    example=_example,
    summary_keys=("npeff_top",),
)
