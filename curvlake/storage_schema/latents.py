"""``latents``: per-layer features of a model over whole splits (probe inputs)."""

import numpy as np

from curvlake.storage_schema._spec import (
    ArraySpec,
    ArtifactSpec,
    AttrSpec,
    rows_within_budget,
    whole_array,
)

#: splits a latents artifact may hold (the run's split names).
LATENT_SPLITS = ("train", "val", "test")


def _example():
    rng = np.random.default_rng(0)
    n_train, n_test = 6, 4
    arrays = {
        "layer": np.array(["conv", "fc"], dtype=object),
        "feature_offset": np.array([0, 8], dtype=np.int64),
        "n_features": np.array([8, 3], dtype=np.int64),
        "layer_shape": np.array(["2,2,2", "3"], dtype=object),
        "train_features": rng.standard_normal((n_train, 11)).astype(np.float32),
        "train_label": rng.integers(0, 3, n_train).astype(np.int64),
        "train_sample_id": np.arange(n_train, dtype=np.int64),
        "test_features": rng.standard_normal((n_test, 11)).astype(np.float32),
        "test_label": rng.integers(0, 3, n_test).astype(np.int64),
        "test_sample_id": np.arange(n_test, dtype=np.int64),
    }
    attrs = {"splits": ["train", "test"], "pool": 2, "pixelwise": False, "num_classes": 3}
    return arrays, attrs


def _split_arrays(split: str) -> tuple[ArraySpec, ...]:
    dim = f"{split}_example"
    return (
        ArraySpec(
            f"{split}_features",
            (dim, "feature"),
            "float32",
            f"features of the {split} split, every layer's side by side (chunks of whole examples)",
            required=False,
            chunking=rows_within_budget,
        ),
        ArraySpec(
            f"{split}_label",
            (dim,),
            "int64",
            f"labels of the {split} split (train: as trained, i.e. noisy with label noise)",
            required=False,
            chunking=whole_array,
        ),
        ArraySpec(
            f"{split}_sample_id",
            (dim,),
            "int64",
            f"index of each {split} example in its source",
            role="coord",
            required=False,
            chunking=whole_array,
        ),
    )


SPEC = ArtifactSpec(
    kind="latents",
    version="1.0",
    description=(
        "Latent representations of a checkpoint (phd-lab's latent datasets): the output of each "
        "feature layer for every example of the stored splits, extracted in eval mode without "
        "augmentation, in the split's order. A conv output (N, C, *spatial) is average-pooled "
        "to `pool` per spatial axis (adaptive average pooling) and flattened in (C, *spatial) "
        "order; `pixelwise` keeps the full map. Layers sit side by side along `feature` in "
        "module order: layer l is columns `feature_offset[l]` to `feature_offset[l] + "
        "n_features[l]`, of shape `layer_shape[l]`. Features are stored in float32, chunked by "
        "blocks of whole examples, zstd-compressed where that pays (`compressed`)."
    ),
    arrays=(
        ArraySpec(
            "layer",
            ("layer",),
            "str",
            "feature layer names, in module order",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "feature_offset",
            ("layer",),
            "int64",
            "first column of each layer",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "n_features",
            ("layer",),
            "int64",
            "columns of each layer",
            role="coord",
            chunking=whole_array,
        ),
        ArraySpec(
            "layer_shape",
            ("layer",),
            "str",
            "shape of one example's features of the layer, comma separated",
            role="coord",
            chunking=whole_array,
        ),
        *(spec for split in LATENT_SPLITS for spec in _split_arrays(split)),
    ),
    attrs=(
        AttrSpec("splits", "the splits stored"),
        AttrSpec("pool", "output size per spatial axis of the average pooling (null: pixelwise)"),
        AttrSpec("pixelwise", "whether conv maps are stored unpooled"),
        AttrSpec("num_classes", "number of classes of the labels"),
    ),
    example=_example,
    summary_keys=("checkpoint", "splits", "pool", "pixelwise", "layers", "source"),
)
