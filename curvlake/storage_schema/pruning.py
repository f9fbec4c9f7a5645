"""``pruning``: a run's checkpoint pruned to several sparsities (M-FAC OBS or magnitude)."""

import numpy as np

from curvlake.storage_schema._spec import (
    ArraySpec,
    ArtifactSpec,
    AttrSpec,
    one_row_per_chunk,
    whole_array,
)


def _example():
    rng = np.random.default_rng(0)
    levels, n_param = 2, 12
    metric = {"dtype": np.float64}
    arrays = {
        "sparsity": np.array([0.5, 0.9]),
        "achieved_sparsity": np.array([0.5, 0.9]),
        "theta": rng.standard_normal((levels, n_param)).astype(np.float32),
        "test_loss": rng.random(levels, **metric),
        "test_accuracy": rng.random(levels, **metric),
        "mask": np.array(["mask-0123456789abcdef", "mask-1123456789abcdef"], dtype=object),
        "layer_pruned": np.array([[5, 0], [9, 0]], dtype=np.int64),
        "baseline_theta": rng.standard_normal((levels, n_param)).astype(np.float32),
        "baseline_test_loss": rng.random(levels, **metric),
        "baseline_test_accuracy": rng.random(levels, **metric),
        "baseline_mask": np.array(["mask-2123456789abcdef", "mask-3123456789abcdef"], dtype=object),
        "baseline_layer_pruned": np.array([[5, 0], [9, 0]], dtype=np.int64),
        "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
        "layer_offset": np.array([0, 10], dtype=np.int64),
        "layer_size": np.array([10, 2], dtype=np.int64),
        "layer_shape": np.array(["2,5", "2"], dtype=object),
        "selected": np.array([True, False]),
    }
    attrs = {
        "method": "mfac",
        "mode": "oneshot",
        "run": "run-0123456789abcdef",
        "checkpoint": 1,
        "scope": "global",
        "grad_window": "grad_window-0123456789abcdef",
        "n_selected": 10,
        "dense_test_loss": 0.3,
        "dense_test_accuracy": 0.9,
    }
    return arrays, attrs


def _level(name: str, dtype: str, what: str, **kwargs) -> ArraySpec:
    return ArraySpec(name, ("level",), dtype, what, chunking=whole_array, **kwargs)


def _table_array(name: str, dtype: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("layer",), dtype, what, role="coord", chunking=whole_array)


_BASELINE = {"variants": ("mfac",)}
_GRADUAL = {"required": False}

SPEC = ArtifactSpec(
    kind="pruning",
    version="1.0",
    description=(
        "A run's checkpoint pruned to each `sparsity` (share of the selected tensors' weights "
        "set to zero; `selected` says which tensors may be pruned). `method=mfac`: Optimal "
        "Brain Surgeon with the M-FAC inverse Fisher of a gradient window (scores "
        "w_q²/(2[F⁻¹]_qq), the other weights updated), with the global (or per-tensor, "
        "`scope=layer`) magnitude baseline beside it (`baseline_*`); `method=magnitude`: the "
        "magnitude pruning alone. `mode=oneshot`: every level from the dense checkpoint; "
        "`mode=gradual`: the levels in order, each fine-tuned (masks re-applied) before the "
        "next, `pruned_test_*` being the metrics before fine-tuning. `theta[l]` are the pruned "
        "(and, gradual, fine-tuned) weights, `mask[l]` the `mask` artifact of the coordinates "
        "kept (every θ coordinate not pruned), metrics on the run's test split."
    ),
    arrays=(
        ArraySpec(
            "sparsity", ("level",), "float64", "target sparsity", role="coord", chunking=whole_array
        ),
        _level("achieved_sparsity", "float64", "share of the selected weights pruned"),
        ArraySpec(
            "theta",
            ("level", "param"),
            "float",
            "pruned flat parameters θ, one chunk row per level",
            chunking=one_row_per_chunk,
        ),
        ArraySpec(
            "buffers",
            ("level", "buffer_value"),
            "float64",
            "flat buffers after fine-tuning (gradual, models with BatchNorm)",
            required=False,
            chunking=one_row_per_chunk,
        ),
        _level("test_loss", "float64", "test loss of the pruned model"),
        _level("test_accuracy", "float64", "test accuracy of the pruned model"),
        _level("mask", "str", "mask artifact id of the kept coordinates"),
        ArraySpec(
            "layer_pruned",
            ("level", "layer"),
            "int64",
            "weights pruned in each tensor",
            chunking=whole_array,
        ),
        _level("pruned_test_loss", "float64", "gradual: test loss before fine-tuning", **_GRADUAL),
        _level(
            "pruned_test_accuracy",
            "float64",
            "gradual: test accuracy before fine-tuning",
            **_GRADUAL,
        ),
        ArraySpec(
            "baseline_theta",
            ("level", "param"),
            "float",
            "magnitude baseline: pruned θ",
            chunking=one_row_per_chunk,
            **_BASELINE,
        ),
        ArraySpec(
            "baseline_buffers",
            ("level", "buffer_value"),
            "float64",
            "magnitude baseline: buffers after fine-tuning (gradual)",
            required=False,
            chunking=one_row_per_chunk,
        ),
        _level("baseline_test_loss", "float64", "magnitude baseline: test loss", **_BASELINE),
        _level(
            "baseline_test_accuracy", "float64", "magnitude baseline: test accuracy", **_BASELINE
        ),
        _level("baseline_mask", "str", "magnitude baseline: mask artifact id", **_BASELINE),
        ArraySpec(
            "baseline_layer_pruned",
            ("level", "layer"),
            "int64",
            "magnitude baseline: weights pruned in each tensor",
            chunking=whole_array,
            **_BASELINE,
        ),
        _level(
            "baseline_pruned_test_loss",
            "float64",
            "magnitude baseline, gradual: test loss before fine-tuning",
            **_GRADUAL,
        ),
        _level(
            "baseline_pruned_test_accuracy",
            "float64",
            "magnitude baseline, gradual: test accuracy before fine-tuning",
            **_GRADUAL,
        ),
        _table_array("layer", "str", "parameter tensor names"),
        _table_array("layer_offset", "int64", "offset of the tensor in θ"),
        _table_array("layer_size", "int64", "number of entries of the tensor"),
        _table_array("layer_shape", "str", "tensor shape, comma separated"),
        ArraySpec(
            "selected", ("layer",), "bool", "whether the tensor may be pruned", chunking=whole_array
        ),
    ),
    attrs=(
        AttrSpec("mode", "`oneshot` or `gradual`"),
        AttrSpec("run", "the pruned run"),
        AttrSpec("checkpoint", "checkpoint index pruned"),
        AttrSpec("scope", "`global` ranking over all selected tensors, or per tensor (`layer`)"),
        AttrSpec("grad_window", "the first step's gradient window (null for magnitude)"),
        AttrSpec("n_selected", "number of weights in the selected tensors"),
        AttrSpec("dense_test_loss", "test loss of the checkpoint before pruning"),
        AttrSpec("dense_test_accuracy", "test accuracy of the checkpoint before pruning"),
    ),
    variant_attr="method",
    example=_example,
    summary_keys=(
        "mode",
        "method",
        "checkpoint",
        "sparsities",
        "n_grads",
        "recompute",
        "block_size",
        "scope",
        "layers",
    ),
)
