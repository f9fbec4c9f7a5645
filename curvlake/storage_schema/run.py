"""``run``: a training run — checkpoints as flat parameter vectors, optimizer state, metrics."""

import numpy as np

from curvlake.storage_schema._spec import (
    DEFAULT_CHUNK_BYTES,
    ArraySpec,
    ArtifactSpec,
    AttrSpec,
    one_row_per_chunk,
    whole_array,
)


def _example():
    rng = np.random.default_rng(0)
    n_ckpt, n_param, n_epoch = 3, 10, 4
    arrays = {
        "theta": rng.standard_normal((n_ckpt, n_param)).astype(np.float32),
        "opt_state": rng.standard_normal((n_ckpt, 1, n_param)).astype(np.float32),
        "opt_slot": np.array(["momentum_buffer"], dtype=object),
        "opt_step": np.arange(n_ckpt, dtype=np.int64),
        "checkpoint_epoch": np.array([0, 2, 4], dtype=np.int64),
        "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
        "layer_offset": np.array([0, 8], dtype=np.int64),
        "layer_size": np.array([8, 2], dtype=np.int64),
        "layer_shape": np.array(["2,4", "2"], dtype=object),
        "epoch": np.arange(n_epoch + 1, dtype=np.int64),
        "lr": np.full(n_epoch + 1, 0.1),
        "train_loss": rng.random(n_epoch + 1),
        "train_accuracy": rng.random(n_epoch + 1),
        "val_loss": rng.random(n_epoch + 1),
        "val_accuracy": rng.random(n_epoch + 1),
        "test_loss": rng.random(n_epoch + 1),
        "test_accuracy": rng.random(n_epoch + 1),
    }
    attrs = {
        "model": "mlp",
        "dataset": "digits",
        "num_classes": 2,
        "input_shape": [4],
        "optimizer": "sgd",
    }
    return arrays, attrs


def one_checkpoint_column_chunks(
    shape: tuple[int, ...], itemsize: int, budget: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """One checkpoint per chunk, every row, as many columns as fit in ``budget`` bytes (the
    M-FAC window of a checkpoint, m x d, can exceed any one chunk)."""
    rows, columns = (max(1, int(s)) for s in shape[1:])
    return (1, rows, max(1, min(columns, budget // (rows * itemsize))))


#: Order of the counters in ``mfac_state``.
MFAC_STATE_FIELDS = ("count", "slot", "since_refresh", "has_inverse")


def _metric(name: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("epoch",), "float64", what, chunking=whole_array)


SPEC = ArtifactSpec(
    kind="run",
    version="1.2",
    description=(
        "A training run (or a model imported from elsewhere, with its data). `theta[c]` is the "
        "flat parameter vector of checkpoint `c` in the parameters' dtype (float32, or float64 "
        "for a float64 model): every tensor of `model.named_parameters()` (frozen ones too) "
        "flattened and concatenated in that order, as described by the layer table "
        "(`curvlake.nn.params`); `opt_state[c]` the optimizer's per-parameter state at that "
        "checkpoint, so a run resumes from any checkpoint bit-exactly (the M-FAC optimizer "
        "keeps its gradient window beside it, `mfac_*`, since 1.2). Metrics are per epoch; "
        "epoch 0 is the initial model (its train metrics are NaN since no training happened). "
        "The full "
        "training config is in the provenance."
    ),
    arrays=(
        ArraySpec(
            "theta",
            ("checkpoint", "param"),
            "float",
            "flat parameters, one chunk row per checkpoint",
            chunking=one_row_per_chunk,
        ),
        ArraySpec(
            "opt_state",
            ("checkpoint", "opt_slot", "param"),
            "float32",
            "optimizer state per parameter (e.g. momentum buffer, Adam moments)",
            chunking=one_row_per_chunk,
        ),
        ArraySpec(
            "opt_slot",
            ("opt_slot",),
            "str",
            "names of the optimizer state slots",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "opt_step",
            ("checkpoint",),
            "int64",
            "optimizer steps taken at the checkpoint",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "checkpoint_epoch",
            ("checkpoint",),
            "int64",
            "epoch of each checkpoint (0 = init)",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "layer",
            ("layer",),
            "str",
            "parameter tensor names",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "layer_offset",
            ("layer",),
            "int64",
            "offset of the tensor in `param`",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "layer_size",
            ("layer",),
            "int64",
            "number of entries of the tensor",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "layer_shape",
            ("layer",),
            "str",
            "tensor shape, comma separated",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "buffers",
            ("checkpoint", "buffer_value"),
            "float64",
            "flat buffers (BatchNorm statistics and counters), exact in float64",
            required=False,
            chunking=one_row_per_chunk,
        ),
        ArraySpec(
            "buffer",
            ("buffer",),
            "str",
            "buffer tensor names",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "buffer_shape",
            ("buffer",),
            "str",
            "buffer shape, comma separated",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "buffer_dtype",
            ("buffer",),
            "str",
            "torch dtype of the buffer",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "module",
            ("module_byte",),
            "uint8",
            "TorchScript or pickled module of a custom architecture (absent for zoo models)",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "train_label",
            ("train_example",),
            "int64",
            "training labels as trained on (after label noise)",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "train_clean_label",
            ("train_example",),
            "int64",
            "training labels before label noise",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "train_sample_id",
            ("train_example",),
            "int64",
            "index of each training example in its source",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            "mfac_window",
            ("checkpoint", "mfac_grad", "mfac_param"),
            "float",
            "M-FAC optimizer: the ring buffer of the last m gradients (trained coordinates, in "
            "the window's dtype)",
            required=False,
            chunking=one_checkpoint_column_chunks,
        ),
        ArraySpec(
            "mfac_gram",
            ("checkpoint", "mfac_grad", "mfac_grad_col"),
            "float64",
            "M-FAC optimizer: the window's Gram matrix G Gᵀ",
            required=False,
            chunking=one_row_per_chunk,
        ),
        ArraySpec(
            "mfac_inverse",
            ("checkpoint", "mfac_grad", "mfac_grad_col"),
            "float64",
            "M-FAC optimizer: K⁻¹ = (mλI + G Gᵀ)⁻¹ as updated step by step (NaN before the "
            "window is full)",
            required=False,
            chunking=one_row_per_chunk,
        ),
        ArraySpec(
            "mfac_state",
            ("checkpoint", "mfac_field"),
            "int64",
            "M-FAC optimizer counters: " + ", ".join(MFAC_STATE_FIELDS),
            required=False,
            chunking=one_row_per_chunk,
        ),
        ArraySpec("epoch", ("epoch",), "int64", "epoch index", role="coord", chunking=whole_array),
        _metric("lr", "learning rate used during the epoch"),
        _metric("train_loss", "mean training loss over the epoch (noisy labels)"),
        _metric("train_accuracy", "training accuracy over the epoch (noisy labels)"),
        _metric("val_loss", "validation loss at the end of the epoch"),
        _metric("val_accuracy", "validation accuracy at the end of the epoch"),
        _metric("test_loss", "test loss at the end of the epoch"),
        _metric("test_accuracy", "test accuracy at the end of the epoch"),
    ),
    attrs=(
        AttrSpec("model", "model zoo name (or `custom`)"),
        AttrSpec("dataset", "dataset name or dataset artifact id"),
        AttrSpec("num_classes", "number of classes"),
        AttrSpec("input_shape", "shape of one input"),
        AttrSpec("optimizer", "sgd, adam or mfac"),
    ),
    example=_example,
    summary_keys=(
        "model",
        "model_params",
        "dataset",
        "label_noise",
        "epochs",
        "optimizer",
        "lr",
        "seed",
        "imported_from",
    ),
)
