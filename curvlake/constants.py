"""Choices shared by the pipelines and the command line (torch-free, so the CLI starts fast).

Each tuple is the one definition of what a user may pass; pipelines validate against it and the
CLI offers it as ``click.Choice``.
"""

#: Data splits of a run's dataset.
SPLITS = ("train", "val", "test")
#: Floating dtypes a computation can run in.
DTYPES = ("float32", "float64")
#: Optimizers of ``curvlake train``.
OPTIMIZERS = ("sgd", "adam", "mfac")
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

# -- parameter masks ------------------------------------------------------------------------------
#: Magnitude masks: the largest |theta_j| over all selected tensors, or per tensor.
MASK_SCOPES = ("global", "layer")

# -- M-FAC ----------------------------------------------------------------------------------------
#: Which examples form the gradients of a window: the split in order, or shuffled per epoch.
GRAD_ORDERS = ("sequential", "shuffled")
#: Where an inverse Fisher keeps its window: chosen by size and device, or explicitly.
WINDOW_BACKENDS = ("auto", "numpy", "cupy", "dask")
#: Pruning criteria: OBS with the M-FAC inverse Fisher, or weight magnitude.
PRUNE_METHODS = ("mfac", "magnitude")
#: OBS weight updates: the sum of single-weight updates, or the exact group solution.
OBS_UPDATES = ("summed", "group")

# -- Hessian eigenspaces ---------------------------------------------------------------------------
#: Recovery modes of the sketched eigendecomposition (curvlake.pipelines.hessian.recovery):
#: the seed's (outer sketch nested in the inner one) first, then skerch 1.x's.
HESSIAN_RECOVERIES = ("recycled", "oversampled", "hmt", "krylov", "nystrom", "singlepass")
#: Kinds of random test matrices (curvlake.pipelines.hessian.test_matrices).
HESSIAN_NOISES = ("ssrft", "gaussian", "rademacher")
#: How `curvlake hessian eig` finds the eigenpairs: sketched, or from the dense Hessian.
HESSIAN_METHODS = ("sketch", "exact")
#: Masks `curvlake hessian overlap` builds itself (largest |theta| of the eigenpairs' checkpoint).
HESSIAN_MAGNITUDE_MASKS = ("magnitude", "magnitude:global", "magnitude:layer")

# -- saturation, latents, probes (PHD-LAB) -------------------------------------------------------
#: What `curvlake train --track` records during training.
TRACKERS = ("saturation",)
#: How a conv output (N, C, *spatial) becomes observations for its covariance.
CONV_METHODS = ("channelwise", "mean", "max", "flatten")
#: Intrinsic-dimension rules: min{k : p_k >= delta}, or delve 0.1.50's count (k* - 1).
SATURATION_RULES = ("textbook", "delve")
#: Sources of a `saturation` artifact.
SATURATION_SOURCES = ("training", "checkpoints", "phdlab")
