"""``probes``: one linear (logistic-regression) probe per layer of a latents artifact."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array

_FIT = ("fit",)


def _coef_chunks(shape: tuple[int, ...], itemsize: int, budget: int) -> tuple[int, ...]:
    """All coefficient rows, as many feature columns as fit the budget."""
    rows = max(1, shape[0])
    return (rows, max(1, min(shape[1], budget // (rows * itemsize))))


def _example():
    rng = np.random.default_rng(0)
    arrays = {
        "layer": np.array(["conv", "fc"], dtype=object),
        "feature_offset": np.array([0, 8], dtype=np.int64),
        "n_features": np.array([8, 3], dtype=np.int64),
        "coef": rng.standard_normal((3, 11)),
        "intercept": rng.standard_normal((2, 3)),
        "mean": rng.standard_normal(11),
        "scale": rng.random(11) + 0.5,
        "train_accuracy": np.array([0.7, 0.9]),
        "val_accuracy": np.array([0.6, 0.85]),
        "test_accuracy": np.array([0.65, 0.88]),
        "n_iter": np.array([30, 12], dtype=np.int64),
        "n_evaluations": np.array([33, 14], dtype=np.int64),
        "converged": np.array([True, True]),
        "objective": np.array([0.8, 0.3]),
    }
    attrs = {"source": "fit", "C": 1.0, "num_classes": 3}
    return arrays, attrs


def _per_layer(name: str, dtype, what: str, variants=None, role="data") -> ArraySpec:
    return ArraySpec(
        name, ("layer",), dtype, what, role=role, chunking=whole_array, variants=variants
    )


SPEC = ArtifactSpec(
    kind="probes",
    version="1.0",
    description=(
        "Linear probes (Alain & Bengio 2016; Richter et al. 2021): per layer of a latents "
        "artifact, in module order, an L2 multinomial logistic regression (binomial for two "
        "classes) from the layer's standardized features z = (x - mean) / scale to the labels, "
        "fitted out of core by L-BFGS on scikit-learn's objective (same optimum as "
        "`LogisticRegression(C=C, solver='lbfgs')`), with train / val / test accuracy and a "
        "convergence report. Layer l's coefficients are `coef[:, feature_offset[l] : "
        "feature_offset[l] + n_features[l]]` (K rows, or 1 for two classes). `source` is `fit` "
        "(`curvlake probes fit`) or `phdlab` (imported probe CSVs: accuracies only; their "
        "`val_accuracy` is NaN, phd-lab's eval split is the test set)."
    ),
    arrays=(
        _per_layer("layer", "str", "probed layers, in module order", role="coord"),
        _per_layer("feature_offset", "int64", "first column of each layer", _FIT, "coord"),
        _per_layer("n_features", "int64", "columns of each layer", _FIT, "coord"),
        ArraySpec(
            "coef",
            ("coef_row", "feature"),
            "float64",
            "coefficients on the standardized features (scikit-learn's coef_, layers side by side)",
            chunking=_coef_chunks,
            variants=_FIT,
        ),
        ArraySpec(
            "intercept",
            ("layer", "coef_row"),
            "float64",
            "intercepts (intercept_)",
            chunking=whole_array,
            variants=_FIT,
        ),
        ArraySpec(
            "mean",
            ("feature",),
            "float64",
            "standardization mean",
            chunking=whole_array,
            variants=_FIT,
        ),
        ArraySpec(
            "scale",
            ("feature",),
            "float64",
            "standardization scale (StandardScaler's: ddof 0, 1 for constant features)",
            chunking=whole_array,
            variants=_FIT,
        ),
        _per_layer("train_accuracy", "float64", "accuracy on the rows the probe was fitted on"),
        _per_layer("val_accuracy", "float64", "accuracy on the validation rows (NaN: none)"),
        _per_layer("test_accuracy", "float64", "accuracy on the test split (NaN: none)"),
        _per_layer("n_iter", "int64", "L-BFGS iterations", _FIT),
        _per_layer("n_evaluations", "int64", "passes over the data (loss and gradient)", _FIT),
        _per_layer("converged", "bool", "stopped on its tolerance, not max_iter", _FIT),
        _per_layer("objective", "float64", "final penalized mean loss", _FIT),
    ),
    attrs=(
        AttrSpec("source", "fit or phdlab"),
        AttrSpec("C", "inverse regularization strength"),
        AttrSpec("num_classes", "number of classes"),
    ),
    variant_attr="source",
    example=_example,
    summary_keys=("source", "C", "layers", "val_fraction"),
)
