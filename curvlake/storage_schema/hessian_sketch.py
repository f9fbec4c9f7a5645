"""``hessian_sketch``: random measurements of the Hessian of a checkpoint's mean loss."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array
from curvlake.storage_schema.mask import _table_array

_INNER_MODES = ("recycled", "oversampled")


def _example():
    rng = np.random.default_rng(0)
    d, k, s, q = 10, 2, 4, 3
    arrays = {
        "outer": rng.standard_normal((d, k)).astype(np.float32),
        "inner": rng.standard_normal((s, s)),
        "probe_image": rng.standard_normal((d, q)).astype(np.float32),
        "sample_id": np.arange(5, dtype=np.int64),
        "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
        "layer_offset": np.array([0, 8], dtype=np.int64),
        "layer_size": np.array([8, 2], dtype=np.int64),
        "layer_shape": np.array(["2,4", "2"], dtype=object),
    }
    attrs = {
        "recovery": "recycled",
        "noise": "ssrft",
        "seed": 0,
        "k": k,
        "s": s,
        "power_iters": 0,
        "n_probes": q,
        "n_params": d,
        "n_hvps": s + q,
        "n_passes": 1,
        "n_data_passes": 2,
        "run": "run-0123456789abcdef",
        "checkpoint": 0,
        "split": "train",
        "n_examples": 5,
        "param_block_size": d,
        "parameter_fingerprint": "0123456789abcdef",
    }
    return arrays, attrs


SPEC = ArtifactSpec(
    kind="hessian_sketch",
    version="1.1",
    description=(
        "Random measurements of the Hessian `A` of the mean loss of a checkpoint over a fixed "
        "data subset (`sample_id`), in eval mode: `outer` = `A Ω` (`recovery=recycled`: "
        "`Ω = Ψ[:, :k]`; `hmt`: the last power iterate), `inner` = `Φᵀ A Ψ` (column `j` is "
        "`Φᵀ (A ψ_j)`; recycled and oversampled), `basis` = `Q = orth(outer)` and "
        "`basis_image` = `A Q` (hmt), `krylov_basis` = `[Q_0 … Q_q]` and `krylov_image` = its "
        "products (krylov: the Rayleigh-Ritz core is `krylov_basisᵀ krylov_image`), "
        "`probe_image` = `A Ω_p` for the Gaussian a-posteriori "
        "probes. The test matrices Ω, Ψ, Φ and Ω_p are not stored: they are "
        "`curvlake.pipelines.hessian.test_matrices.RandomTestMatrix(noise, seed, operator, "
        "shape)` with operators `outer`, `inner_right`, `inner_left` and `probe` "
        "(`noise=seed_ssrft`: the SSRFTs of the seed's skerch 0.x with seeds "
        "`seed_inner_left` / `seed_inner_right`, see `hessian.hdf5_import`). Parameter axes "
        "are chunked by `param_block_size` rows and column blocks; `n_hvps` and `n_passes` "
        "are the budget of `recovery.budget`, checked against the operators' counters; "
        "`n_data_passes` counts the passes the tasks made (one per column block). Solve it "
        "with `curvlake hessian solve`."
    ),
    arrays=(
        ArraySpec("outer", ("param", "outer_column"), "float", "the outer sketch A Ω"),
        ArraySpec(
            "inner",
            ("inner_row", "inner_column"),
            "float64",
            "the inner sketch Φᵀ A Ψ",
            variants=_INNER_MODES,
            chunking=whole_array,
        ),
        ArraySpec(
            "basis",
            ("param", "outer_column"),
            "float",
            "orthonormal basis Q of the outer sketch (hmt)",
            variants=("hmt",),
        ),
        ArraySpec(
            "basis_image",
            ("param", "outer_column"),
            "float",
            "A Q, the second pass of hmt",
            variants=("hmt",),
        ),
        ArraySpec(
            "krylov_basis",
            ("param", "krylov_column"),
            "float",
            "the block Krylov basis [Q_0 … Q_q], block j in columns [jk, (j+1)k) (krylov)",
            variants=("krylov",),
        ),
        ArraySpec(
            "krylov_image",
            ("param", "krylov_column"),
            "float",
            "A [Q_0 … Q_q], the products of the Krylov basis (krylov)",
            variants=("krylov",),
        ),
        ArraySpec(
            "probe_image",
            ("param", "probe"),
            "float",
            "A Ω_p for the Gaussian error probes (when n_probes > 0)",
            required=False,
        ),
        ArraySpec(
            "sample_id",
            ("example",),
            "int64",
            "the examples of the split the Hessian averages over (absent when imported)",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
        _table_array("layer", "str", "parameter tensor names"),
        _table_array("layer_offset", "int64", "offset of the tensor in θ"),
        _table_array("layer_size", "int64", "number of entries of the tensor"),
        _table_array("layer_shape", "str", "tensor shape, comma separated"),
    ),
    attrs=(
        AttrSpec("recovery", "recycled, oversampled, hmt, krylov, nystrom or singlepass"),
        AttrSpec("noise", "test-matrix kind: ssrft, gaussian, rademacher (or seed_ssrft)"),
        AttrSpec("seed", "seed of the test matrices"),
        AttrSpec("k", "outer sketch size (eigenpairs recovered)"),
        AttrSpec("s", "inner sketch size (recycled, oversampled; else null)"),
        AttrSpec("power_iters", "subspace iterations (hmt) or Krylov depth (krylov)"),
        AttrSpec("n_probes", "Gaussian a-posteriori probes measured"),
        AttrSpec("n_params", "P, the length of θ"),
        AttrSpec("n_hvps", "Hessian-vector products spent"),
        AttrSpec("n_passes", "sequential rounds of data passes (columns of a round in parallel)"),
        AttrSpec("n_data_passes", "passes over the data made by the tasks"),
        AttrSpec("run", "the run"),
        AttrSpec("checkpoint", "checkpoint index"),
        AttrSpec("split", "data split of the subset (null if unknown)"),
        AttrSpec("n_examples", "size of the data subset (null if unknown)"),
        AttrSpec("param_block_size", "rows of θ per chunk of the param axis"),
        AttrSpec("parameter_fingerprint", "fingerprint of the layer table"),
        AttrSpec("seed_inner_left", "seed of Φ (noise=seed_ssrft)", required=False),
        AttrSpec("seed_inner_right", "seed of Ψ (noise=seed_ssrft)", required=False),
    ),
    variant_attr="recovery",
    example=_example,
    summary_keys=("recovery", "noise", "k", "s", "checkpoint", "split", "n_examples"),
)
