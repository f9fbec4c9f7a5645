"""A synthetic lake holding every kind, its artifacts referring to each other as real ones do.

Artifacts are written directly with the lake's writer (tiny arrays, no training), so a lake of
a hundred artifacts takes seconds; the comparison artifacts are computed by the real
``curvlake.pipelines.compare`` entry points from the synthetic inputs. ``broken=True`` adds a
failed artifact, a staged (interrupted) one and one of a kind this curvlake does not know.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from curvlake.lake import Lake, open_lake
from curvlake.pipelines.compare import (
    run_drift,
    run_examples,
    run_layers,
    run_masks_eigenspace,
)
from curvlake.storage_schema import SPECS

#: The run's parameter space: 10 parameters in two tensors.
TABLE = {
    "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
    "layer_offset": np.array([0, 8], dtype=np.int64),
    "layer_size": np.array([8, 2], dtype=np.int64),
    "layer_shape": np.array(["2,4", "2"], dtype=object),
}
N_PARAMS = 10
FEATURE_LAYERS = ["conv1", "conv2", "fc"]
UNKNOWN_ID = "mystery-0123456789abcdef"


def put(lake: Lake, kind: str, arrays: dict, attrs: dict, config: dict, inputs=()) -> str:
    """Write one complete artifact."""
    writer = lake.begin(kind, config, list(inputs))
    if not writer.complete:
        writer.write_many(arrays)
        writer.set_attrs(**attrs)
        writer.commit()
    return writer.id


def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def write_run(lake: Lake, copy: int, width: int) -> str:
    rng = np.random.default_rng([copy, width])
    epochs = np.arange(5)
    metrics = {
        f"{split}_{name}": rng.random(5)
        for split in ("train", "val", "test")
        for name in ("loss", "accuracy")
    }
    metrics["train_loss"][0] = metrics["train_accuracy"][0] = np.nan
    arrays = {
        "theta": rng.standard_normal((3, N_PARAMS)).astype(np.float32),
        "opt_state": np.zeros((3, 1, N_PARAMS), dtype=np.float32),
        "opt_slot": np.array(["momentum_buffer"], dtype=object),
        "opt_step": np.array([0, 20, 40], dtype=np.int64),
        "checkpoint_epoch": np.array([0, 2, 4], dtype=np.int64),
        **TABLE,
        "epoch": epochs,
        "lr": np.full(5, 0.1),
        **metrics,
    }
    attrs = {
        "model": "mlp",
        "model_params": {"widths": [width]},
        "dataset": "digits",
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "optimizer": "sgd",
    }
    config = {"model": "mlp", "model_params": {"widths": [width]}, "dataset": "digits"}
    return put(lake, "run", arrays, attrs, {**config, "copy": copy})


def write_stats(lake: Lake, copy: int, runs: list[str]) -> str:
    rng = np.random.default_rng([copy, 1])
    n = 20
    shape = (len(runs), 3, n)
    arrays = {
        "jacobian_operator": rng.random(shape),
        "jacobian_frobenius": 1 + rng.random(shape),
        "cross_entropy": rng.random(shape),
        "accuracy": (rng.random(shape) > 0.3).astype(np.float64),
        "run": np.array(runs, dtype=object),
        "checkpoint_epoch": np.array([[0, 2, 4]] * len(runs), dtype=np.int64),
        "sample_id": np.arange(n, dtype=np.int64),
        "label": rng.integers(0, 10, (len(runs), n)).astype(np.int64),
        "clean_label": rng.integers(0, 10, n).astype(np.int64),
    }
    attrs = {
        "split": "train",
        "normalization": "none",
        "input_space": "standardized",
        "metrics": ["jacobian_operator", "jacobian_frobenius", "cross_entropy", "accuracy"],
        "target_only": False,
    }
    return put(lake, "jacobian_stats", arrays, attrs, {"split": "train", "copy": copy}, runs)


def write_npeff_family(lake: Lake, copy: int, run: str) -> tuple[str, str]:
    rng = np.random.default_rng([copy, 2])
    n, k = 12, 3
    indices = np.sort(np.stack([rng.choice(N_PARAMS, k, replace=False) for _ in range(n)]), 1)
    pefs = put(
        lake,
        "pefs",
        {
            "values": rng.random((n, k)).astype(np.float32),
            "indices": indices.astype(np.int64),
            "dense_norm": rng.random(n).astype(np.float32) + 0.1,
            "logits": rng.standard_normal((n, 10)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int64),
            "sample_id": np.arange(3, 3 + n, dtype=np.int64),
        },
        {
            "pef_kind": "diag",
            "storage": "topk",
            "n_parameters": N_PARAMS,
            "num_classes": 10,
            "run": run,
            "checkpoint": 1,
            "split": "train",
        },
        {"checkpoint": 1, "split": "train", "k": k, "copy": copy},
        [run],
    )
    group = lake.group(pefs)
    npeff = put(
        lake,
        "npeff",
        {
            "W": rng.random((n, 3)),
            "H": rng.random((3, 5)).astype(np.float32),
            "kept_columns": np.array([0, 2, 3, 7, 9], dtype=np.int64),
            "loss": np.geomspace(0.9, 0.3, 30),
            "seconds": np.full(30, 0.01),
            "label": np.asarray(group["label"][:]),
            "sample_id": np.asarray(group["sample_id"][:]),
        },
        {
            "format": "dense",
            "n_components": 3,
            "n_parameters": N_PARAMS,
            "solver": "hals",
            "converged": False,
            "pefs": pefs,
        },
        {"n_components": 3, "solver": "hals", "copy": copy},
        [pefs],
    )
    return pefs, npeff


def write_example(lake: Lake, kind: str, copy: int, inputs: list[str], **attrs) -> str:
    arrays, example_attrs = SPECS[kind].example()
    return put(lake, kind, arrays, {**example_attrs, **attrs}, {"copy": copy}, inputs)


def write_mask(
    lake: Lake,
    copy: int,
    run: str,
    index: list[int],
    config: dict,
    source: str,
    checkpoint: int | None = 1,
) -> str:
    """A mask artifact of the run's 10 parameters (fc.weight 0..7, fc.bias 8..9)."""
    counts = np.bincount(np.searchsorted([8], index, side="right"), minlength=2)
    attrs = {
        "n_params": N_PARAMS,
        "source": source,
        "scope": "global",
        "run": run,
        "checkpoint": checkpoint,
        "parameter_fingerprint": "synthetic",
    }
    arrays = {"index": np.array(index, dtype=np.int64), **TABLE, "layer_count": counts}
    config = {**config, "copy": copy, "source": source, "checkpoint": checkpoint}
    return put(lake, "mask", arrays, attrs, config, [run])


def write_eigs(
    lake: Lake,
    copy: int,
    run: str,
    checkpoint: int,
    vectors: np.ndarray | None = None,
    table: dict | None = None,
) -> str:
    """A hessian_eigs artifact: ``vectors`` (P x k, default a random orthonormal 10 x 3)."""
    rng = np.random.default_rng([copy, 3, checkpoint])
    if vectors is None:
        vectors = orthonormal(rng, N_PARAMS, 3)
    n_params, k = vectors.shape
    return put(
        lake,
        "hessian_eigs",
        {
            "eigenvalues": np.geomspace(4.0, 0.5, k) * np.resize([1, -1, 1], k),
            "eigenvectors": vectors,
            "scree_lower": np.linspace(1.0, 0.1, k + 1),
            "scree_upper": np.linspace(1.0, 0.2, k + 1),
            "scree_lower_strict": np.linspace(0.9, 0.05, k + 1),
            **(table or TABLE),
        },
        {
            "method": "sketch",
            "recovery": "recycled",
            "noise": "ssrft",
            "k": k,
            "n_params": n_params,
            "n_hvps": 10,
            "n_passes": 1,
            "frob2": 21.0,
            "frob2_approx": 20.25,
            "err2": 0.75,
            "run": run,
            "checkpoint": checkpoint,
            "sketch": None,
            "parameter_fingerprint": "synthetic",
        },
        {"k": k, "checkpoint": checkpoint, "copy": copy, "vectors": vectors.tolist()},
        [run],
    )


def write_phdlab(lake: Lake, copy: int, run: str) -> tuple[str, str, str]:
    rng = np.random.default_rng([copy, 4])
    n_layers = len(FEATURE_LAYERS)
    widths = np.array([4, 6, 10], dtype=np.int64)
    saturation = put(
        lake,
        "saturation",
        {
            "epoch": np.array([1, 2, 3, 4], dtype=np.int64),
            "phase": np.array(["train", "eval"], dtype=object),
            "layer": np.array(FEATURE_LAYERS, dtype=object),
            "n_features": widths,
            "eigen_offset": np.concatenate([[0], np.cumsum(widths)[:-1]]),
            "eigenvalue": rng.random((4, 2, int(widths.sum()))),
            "intrinsic_dimension": rng.integers(1, 4, (4, 2, n_layers)),
            "saturation": rng.random((4, 2, n_layers)),
            "trace": rng.random((4, 2, n_layers)),
            "n_samples": np.full((4, 2, n_layers), 64, dtype=np.int64),
        },
        {
            "source": "training",
            "delta": 0.99,
            "rule": "textbook",
            "ddof": 0,
            "conv_method": "channelwise",
            "eval_split": "test",
        },
        {"source": "training", "copy": copy},
        [run],
    )
    latents = put(
        lake,
        "latents",
        {
            "layer": np.array(FEATURE_LAYERS, dtype=object),
            "feature_offset": np.array([0, 4, 10], dtype=np.int64),
            "n_features": widths,
            "layer_shape": np.array(["4", "6", "10"], dtype=object),
            "train_features": rng.standard_normal((6, 20)).astype(np.float32),
            "train_label": rng.integers(0, 3, 6).astype(np.int64),
            "train_sample_id": np.arange(6, dtype=np.int64),
        },
        {"splits": ["train"], "pool": 2, "pixelwise": False, "num_classes": 3},
        {"checkpoint": 2, "copy": copy},
        [run],
    )
    probes = put(
        lake,
        "probes",
        {
            "layer": np.array(FEATURE_LAYERS, dtype=object),
            "train_accuracy": np.array([0.5, 0.8, 0.9]),
            "val_accuracy": np.full(3, np.nan),
            "test_accuracy": np.array([0.4, 0.7, 0.75]),
        },
        {"source": "phdlab", "C": 1.0, "num_classes": 3},
        {"copy": copy},
        [latents],
    )
    receptive_field = put(
        lake,
        "receptive_field",
        {
            "layer": np.array(FEATURE_LAYERS, dtype=object),
            "r_min": np.array([[3.0, 3.0], [9.0, 9.0], [np.inf, np.inf]]),
            "r_max": np.array([[3.0, 3.0], [11.0, 11.0], [np.inf, np.inf]]),
            "jump": np.array([[1.0, 1.0], [2.0, 2.0], [np.inf, np.inf]]),
            "start": np.array([[0.5, 0.5], [0.5, 0.5], [2.0, 2.0]]),
            "map_size": np.array([[8, 8], [4, 4], [-1, -1]], dtype=np.int64),
        },
        {"input_size": [8, 8], "border_layer": "conv2", "border_layer_max": "conv2"},
        {"copy": copy},
        [run],
    )
    return saturation, probes, receptive_field


def write_pruning(lake: Lake, copy: int, run: str) -> str:
    sparsities = [0.3, 0.6]
    masks = {}
    for chain in ("method", "baseline"):
        masks[chain] = [
            write_mask(
                lake,
                copy,
                run,
                list(range(round((1 - s) * N_PARAMS)))
                if chain == "method"
                else list(range(N_PARAMS - round((1 - s) * N_PARAMS), N_PARAMS)),
                {"chain": chain, "level": s, "method": "mfac"},
                "prune",
            )
            for s in sparsities
        ]
    arrays, attrs = SPECS["pruning"].example()
    arrays.update(
        mask=np.array(masks["method"], dtype=object),
        baseline_mask=np.array(masks["baseline"], dtype=object),
        layer_pruned=np.zeros((2, 2), dtype=np.int64),
        baseline_layer_pruned=np.zeros((2, 2), dtype=np.int64),
        theta=np.zeros((2, N_PARAMS), dtype=np.float32),
        baseline_theta=np.zeros((2, N_PARAMS), dtype=np.float32),
        **TABLE,
    )
    attrs.update(run=run, checkpoint=1, grad_window=None)
    return put(lake, "pruning", arrays, attrs, {"method": "mfac", "copy": copy}, [run])


def add_copy(lake: Lake, copy: int) -> dict[str, str]:
    """One coherent set of artifacts of every kind (``copy`` makes their ids distinct)."""
    ids: dict[str, str] = {}
    ids["dataset"] = write_example(lake, "dataset", copy, [])
    run, wide = write_run(lake, copy, 8), write_run(lake, copy, 32)
    ids["run"] = run
    ids["jacobian_stats"] = write_stats(lake, copy, [run, wide])
    ids["pefs"], ids["npeff"] = write_npeff_family(lake, copy, run)
    ids["npeff_perturbation"] = write_example(
        lake,
        "npeff_perturbation",
        copy,
        [ids["npeff"]],
        npeff=ids["npeff"],
        pefs=ids["pefs"],
        run=run,
    )
    ids["dsf"] = write_example(lake, "dsf", copy, [run])
    ids["mask"] = write_mask(lake, copy, run, [1, 2, 5, 8], {"fraction": 0.4}, "magnitude")
    ids["pruning"] = write_pruning(lake, copy, run)
    ids["grad_window"] = write_example(lake, "grad_window", copy, [run], run=run)
    ids["hessian_sketch"] = write_example(lake, "hessian_sketch", copy, [run], run=run)
    eigs = [write_eigs(lake, copy, run, c) for c in (0, 1, 2)]
    ids["hessian_eigs"] = eigs[1]
    ids["hessian_overlap"] = write_example(
        lake,
        "hessian_overlap",
        copy,
        [eigs[1], ids["mask"]],
        eigs=eigs[1],
        mask=ids["mask"],
        run=run,
    )
    ids["saturation"], ids["probes"], ids["receptive_field"] = write_phdlab(lake, copy, run)
    ids["saturation_projection"] = write_example(lake, "saturation_projection", copy, [run])
    ids["comparison_masks"] = run_masks_eigenspace(lake, eigs[1], n_top_params=3)
    ids["comparison_drift"] = run_drift(lake, eigs, mode="reference")
    ids["comparison_examples"] = run_examples(lake, ids["npeff"], stats=ids["jacobian_stats"])
    ids["comparison_layers"] = run_layers(
        lake,
        saturation=ids["saturation"],
        probes=[ids["probes"]],
        receptive_field=ids["receptive_field"],
    )
    return ids


def add_broken(lake: Lake) -> dict[str, str]:
    """A failed artifact, an interrupted one still in staging, one of an unknown kind."""
    failed = lake.begin("npeff", {"case": "failed"})
    failed.create_array("loss", (3,))
    failed.fail("RuntimeError: the fit diverged")
    staged = lake.begin("pefs", {"case": "interrupted"})
    staged.create_array("dense_norm", (4,))
    lake._release(staged.id)  # as if the writing process had been killed
    folder = Path(lake.root) / "mystery" / UNKNOWN_ID
    folder.mkdir(parents=True)
    attrs = {
        "curvlake:kind": "mystery",
        "curvlake:schema_version": "1.0",
        "curvlake:status": "complete",
        "curvlake:provenance": {"created_at": "2026-01-01T00:00:00+00:00", "inputs": []},
    }
    (folder / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )
    return {"failed": failed.id, "staged": staged.id, "unknown": UNKNOWN_ID}


def build_lake(path: str | Path, *, copies: int = 1, broken: bool = True) -> tuple[Lake, dict]:
    """A lake with ``copies`` sets of :func:`add_copy` (and :func:`add_broken`)."""
    lake = open_lake(path, create=True)
    ids = {"copies": [add_copy(lake, c) for c in range(copies)]}
    if broken:
        ids.update(add_broken(lake))
    return lake, ids
