"""``hessian_eigs``: top eigenpairs of a checkpoint's Hessian (sketched or exact)."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array
from curvlake.storage_schema.mask import _table_array


def _example():
    rng = np.random.default_rng(0)
    d, k, q = 10, 3, 4
    u = np.linalg.qr(rng.standard_normal((d, k)))[0]
    arrays = {
        "eigenvalues": np.array([3.0, -2.0, 0.5]),
        "eigenvectors": u.astype(np.float32),
        "scree_lower": np.linspace(1.0, 0.1, k + 1),
        "scree_upper": np.linspace(1.0, 0.2, k + 1),
        "scree_lower_strict": np.linspace(0.9, 0.0, k + 1),
        "probe_norms": rng.random((3, q)),
        "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
        "layer_offset": np.array([0, 8], dtype=np.int64),
        "layer_size": np.array([8, 2], dtype=np.int64),
        "layer_shape": np.array(["2,4", "2"], dtype=object),
    }
    attrs = {
        "method": "sketch",
        "recovery": "recycled",
        "noise": "ssrft",
        "k": k,
        "n_params": d,
        "n_hvps": 10,
        "n_passes": 1,
        "frob2": 14.0,
        "frob2_approx": 13.25,
        "err2": 0.75,
        "run": "run-0123456789abcdef",
        "checkpoint": 0,
        "sketch": "hessian_sketch-0123456789abcdef",
        "parameter_fingerprint": "0123456789abcdef",
    }
    return arrays, attrs


SPEC = ArtifactSpec(
    kind="hessian_eigs",
    version="1.0",
    description=(
        "The top-k eigenpairs of the Hessian `A` of a checkpoint's mean loss, by |λ| descending "
        "(Hessians are indefinite): `A ≈ U diag(λ) Uᵀ` with orthonormal `eigenvectors` `U` "
        "(param, eigenpair), chunked along `param` (the layer table says which tensor a row "
        "is). Sign convention: the entry of largest magnitude of each eigenvector is positive. "
        "`method=sketch`: solved from a `hessian_sketch` (attribute `sketch`); `frob2`, "
        "`frob2_approx` and `err2` estimate ‖A‖²_F, ‖Â‖²_F and ‖A − Â‖²_F from the Gaussian "
        "probes (`probe_norms`: per probe ‖Aω‖², ‖Âω‖², ‖(A − Â)ω‖²; `error_tail_bounds`: "
        "probabilities that `err2` is off by a factor 1 ± ε, Tropp et al. 2019 §6.4) and "
        "`scree_*[r]` bound the share of ‖A‖²_F outside the top-r components (r = 0..k). "
        "`method=exact`: the dense Hessian's eigenpairs, `frob2` and `err2` exact and the "
        "three scree arrays equal. Both methods store the same arrays, so they compare "
        "directly."
    ),
    arrays=(
        ArraySpec(
            "eigenvalues",
            ("eigenpair",),
            "float64",
            "eigenvalues by |λ| descending",
            chunking=whole_array,
        ),
        ArraySpec(
            "eigenvectors",
            ("param", "eigenpair"),
            "float",
            "orthonormal eigenvectors, one column per eigenvalue",
        ),
        ArraySpec(
            "scree_lower",
            ("rank",),
            "float64",
            "(τ_{r+1}(Â)/N)²: the proxy lower bound of the scree (N = ‖A‖_F estimate)",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "scree_upper",
            ("rank",),
            "float64",
            "((τ_{r+1}(Â) + err)/N)²: upper bound of the scree",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "scree_lower_strict",
            ("rank",),
            "float64",
            "(max(τ_{r+1}(Â) − err, 0)/N)²: Mirsky lower bound of the scree",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "probe_norms",
            ("estimate", "probe"),
            "float64",
            "per probe: ‖Aω‖², ‖Âω‖², ‖(A − Â)ω‖² (method=sketch with probes)",
            required=False,
            chunking=whole_array,
        ),
        _table_array("layer", "str", "parameter tensor names"),
        _table_array("layer_offset", "int64", "offset of the tensor in θ"),
        _table_array("layer_size", "int64", "number of entries of the tensor"),
        _table_array("layer_shape", "str", "tensor shape, comma separated"),
    ),
    attrs=(
        AttrSpec("method", "sketch or exact"),
        AttrSpec("recovery", "recovery mode of the sketch (null for exact)"),
        AttrSpec("noise", "test-matrix kind of the sketch (null for exact)"),
        AttrSpec("k", "number of eigenpairs"),
        AttrSpec("n_params", "P, the length of θ"),
        AttrSpec("n_hvps", "Hessian-vector products spent (sketch and solve)"),
        AttrSpec("n_passes", "sequential rounds of data passes"),
        AttrSpec("frob2", "‖A‖²_F (estimate; null without probes)"),
        AttrSpec("frob2_approx", "‖Â‖²_F (estimate; null without probes)"),
        AttrSpec("err2", "‖A − Â‖²_F (estimate; null without probes)"),
        AttrSpec("run", "the run"),
        AttrSpec("checkpoint", "checkpoint index"),
        AttrSpec("sketch", "the hessian_sketch solved (null for exact)"),
        AttrSpec("parameter_fingerprint", "fingerprint of the layer table"),
        AttrSpec("error_tail_bounds", "{ε: [P(under by ε), P(over by ε)]}", required=False),
    ),
    example=_example,
    summary_keys=("method", "recovery", "noise", "k", "checkpoint", "rcond"),
)
