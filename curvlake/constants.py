"""Choices shared by the pipelines and the command line (torch-free, so the CLI starts fast).

Each tuple is the one definition of what a user may pass; pipelines validate against it and the
CLI offers it as ``click.Choice``.
"""

#: Data splits of a run's dataset.
SPLITS = ("train", "val", "test")
#: Floating dtypes a computation can run in.
DTYPES = ("float32", "float64")
#: Optimizers of ``curvlake train``.
OPTIMIZERS = ("sgd", "adam")
#: Standardization of inputs: train-split statistics, the seeds' published constants, or none.
STANDARDIZE_MODES = ("train", "published", "none")
#: Built-in datasets (read from local files, never downloaded; digits is bundled).
DATASET_NAMES = ("digits", "mnist", "cifar10", "cifar100")

# -- NPEFF --------------------------------------------------------------------------------------
#: Per-example Fisher kinds: diagonal, low-rank (all or top-k classes), variable rank.
PEF_KINDS = ("diag", "lowrank", "lvrm")
#: How PEFs are stored: top-k entries per example, or dense.
PEF_STORAGES = ("topk", "dense")
#: Dataset-level Fisher: expectation over the model's classes, or one sampled class.
DSF_MODES = ("expectation", "sampling")
#: NPEFF factorization kinds (D-NPEFF, LRM-NPEFF).
NPEFF_KINDS = ("diag", "lowrank")
#: D-NPEFF solvers.
NMF_SOLVERS = ("hals", "mu")
#: Coefficient solvers with fixed components.
COEFF_METHODS = ("hals", "active_set", "mu")

# -- dataset statistics ----------------------------------------------------------------------------
#: Per-example statistics of ``curvlake stats compute``.
STATS_METRICS = (
    "accuracy",
    "cross_entropy",
    "confidence",
    "jacobian_frobenius",
    "jacobian_operator",
)
#: The statistics that are input-Jacobian norms.
JACOBIAN_METRICS = ("jacobian_frobenius", "jacobian_operator")
#: Output maps applied before the Jacobian.
NORMALIZATIONS = ("none", "softmax", "logsoftmax", "crossentropy")
#: Operator-norm methods.
NORM_METHODS = ("exact", "lanczos")
#: Input space of the Jacobian.
INPUT_SPACES = ("standardized", "raw")

# -- parameter masks -------------------------------------------------------------------------------
#: Magnitude masks: the largest |theta_j| over all selected tensors, or per tensor.
MASK_SCOPES = ("global", "layer")
