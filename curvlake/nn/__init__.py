"""Datasets, label noise, the model zoo, training-loop primitives and parameter grids.

Pure library code (no lake): the lake and CLI build on these functions.
"""

from curvlake.nn.datasets import (
    DATASET_NAMES,
    DEFAULT_VAL_SIZES,
    STANDARDIZE_MODES,
    Split,
    Splits,
    augment_batch,
    from_arrays,
    load_npz,
    load_splits,
)
from curvlake.nn.grids import expand_grid, expand_train_grid, load_grid
from curvlake.nn.label_noise import apply_label_noise
from curvlake.nn.models import (
    MODEL_NAMES,
    build_model,
    count_parameters,
    model_params,
    resolve_model_params,
)
from curvlake.nn.training import (
    TrainConfig,
    checkpoint_epochs,
    evaluate,
    learning_rate,
    load_training_data,
    make_model,
    make_optimizer,
    resolve_device,
    train_epochs,
    train_one_epoch,
    with_label_noise,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_VAL_SIZES",
    "MODEL_NAMES",
    "STANDARDIZE_MODES",
    "Split",
    "Splits",
    "TrainConfig",
    "apply_label_noise",
    "augment_batch",
    "build_model",
    "checkpoint_epochs",
    "count_parameters",
    "evaluate",
    "expand_grid",
    "expand_train_grid",
    "from_arrays",
    "learning_rate",
    "load_grid",
    "load_npz",
    "load_splits",
    "load_training_data",
    "make_model",
    "make_optimizer",
    "model_params",
    "resolve_device",
    "resolve_model_params",
    "train_epochs",
    "train_one_epoch",
    "with_label_noise",
]
