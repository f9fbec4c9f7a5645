"""Per-example Fishers of a checkpoint into the lake: ``run_pefs``, ``run_dsf``, ``run_filter``.

Tasks are blocks of examples. Each loads the checkpoint once per worker process, computes the
PEFs of its block with the kernels of :mod:`curvlake.pipelines.npeff.pefs`, and writes its own
chunk rows (values, indices, norms, logits), then marks its block done, so a killed computation
resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from curvlake.engine import run_tasks, torch_device
from curvlake.errors import UserInputError
from curvlake.lake import Lake, open_lake
from curvlake.lake.checkpoints import cached_model
from curvlake.nn.datasets import Split
from curvlake.pipelines.npeff import pefs as kernels
from curvlake.pipelines.train import cached_run_splits

PEF_KINDS = ("diag", "lowrank", "lvrm")
STORAGES = ("topk", "dense")


def _check_run(lake: Lake, run_id: str, split: str, checkpoint: int) -> Split:
    info = lake.info(run_id)
    if info.kind != "run":
        raise UserInputError(f"{run_id} is a {info.kind} artifact, not a run")
    if "imported_from" in info.config:
        raise UserInputError(
            f"{run_id} was imported without its data; PEFs need a run trained in the lake"
        )
    if split not in ("train", "val", "test"):
        raise UserInputError(f"split={split!r} is not one of: train, val, test")
    n_checkpoints = lake.group(run_id)["theta"].shape[0]
    if not -n_checkpoints <= checkpoint < n_checkpoints:
        raise UserInputError(
            f"run {run_id} has checkpoints 0..{n_checkpoints - 1}; got {checkpoint}"
        )
    return cached_run_splits(lake.url, run_id).split(split)


def _pef_block(
    lake_url: str,
    run_id: str,
    checkpoint: int,
    split: str,
    rows: slice,
    outputs: dict,
    done,
    block: int,
    options: dict,
) -> int:
    model = cached_model(lake_url, run_id, checkpoint)
    x = torch.as_tensor(cached_run_splits(lake_url, run_id).split(split).x[rows])
    device = torch_device()
    common = {"dtype": torch.float32, "device": device}
    kind, k = options["pef_kind"], options["k"]
    outputs["logits"][rows] = kernels.predict_logits(model, x, **common).cpu().numpy()
    if kind == "diag":
        f = kernels.per_example_fisher_diag(model, x, min_prob=options["min_prob"], **common)
        if options["storage"] == "dense":
            values, norm = kernels.dense_diag(f)
            outputs["dense"][rows] = values.cpu().numpy()
        else:
            values, indices, norm = kernels.topk_sparsify_diag(f, k)
            outputs["values"][rows] = values.cpu().numpy()
            outputs["indices"][rows] = indices.cpu().numpy()
    else:
        if kind == "lowrank":
            a = kernels.per_example_fisher_lowrank(
                model, x, top_k_classes=options["top_k_classes"], **common
            )
        else:
            a, rank, _ = kernels.per_example_fisher_lvrm(
                model, x, max_classes=options["max_classes"], min_prob=options["min_prob"], **common
            )
            outputs["rank"][rows] = rank.cpu().numpy()
        if options["storage"] == "dense":
            factors, norm = kernels.dense_lowrank(a)
            outputs["factors"][rows] = factors.cpu().numpy()
        else:
            values, class_index, indices, norm = kernels.topk_sparsify_lowrank(a, k)
            outputs["values"][rows] = values.cpu().numpy()
            outputs["indices"][rows] = indices.cpu().numpy()
            outputs["class_index"][rows] = class_index.cpu().numpy()
    outputs["dense_norm"][rows] = norm.cpu().numpy()
    done[block] = 1
    return block


def run_pefs(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    split: str = "train",
    n_examples: int | None = None,
    pef_kind: str = "diag",
    k: int | None = 4096,
    storage: str = "topk",
    min_prob: float | None = None,
    top_k_classes: int | None = None,
    max_classes: int | None = None,
    block_size: int = 256,
    progress: bool = True,
) -> str:
    """Per-example Fishers of a run's checkpoint on the first ``n_examples`` of a split.

    Args:
        lake: the lake (or its URL).
        run_id: a run trained in the lake.
        checkpoint: checkpoint index (negative from the end).
        split: train (labels as trained), val or test.
        n_examples: how many examples (default: the whole split).
        pef_kind: ``diag`` (D-PEF), ``lowrank`` (LRM-PEF) or ``lvrm`` (variable rank).
        k: entries kept per example (``storage=topk``; clipped to the number of entries).
        storage: ``topk`` (sparse) or ``dense`` (small models).
        min_prob: diag: drop classes with p < min_prob; lvrm: keep classes with p >= min_prob.
        top_k_classes: lowrank: keep the classes of the largest logits.
        max_classes: lvrm: at most this many classes per example.
        block_size: examples per task and per stored chunk row.

    Returns:
        The ``pefs`` artifact id.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    data = _check_run(lake, run_id, split, checkpoint)
    checkpoint %= lake.group(run_id)["theta"].shape[0]
    if pef_kind not in PEF_KINDS:
        raise UserInputError(f"kind={pef_kind!r} is not one of: {', '.join(PEF_KINDS)}")
    if storage not in STORAGES:
        raise UserInputError(f"storage={storage!r} is not one of: {', '.join(STORAGES)}")
    if pef_kind == "lowrank" and (min_prob is not None or max_classes is not None):
        raise UserInputError(
            "lowrank PEFs take top_k_classes (--top-k-classes), not min_prob / max_classes"
        )
    if pef_kind == "diag" and (max_classes is not None or top_k_classes is not None):
        raise UserInputError(
            "diag PEFs take min_prob (--min-prob) only, not max_classes / top_k_classes"
        )
    if pef_kind == "lvrm" and (max_classes is None or min_prob is None):
        raise UserInputError(
            "lvrm PEFs need both max_classes and min_prob (--max-classes M --min-prob P): each "
            "example keeps its classes with p >= min_prob, at most max_classes of them"
        )
    n = len(data) if n_examples is None else int(n_examples)
    if not 1 <= n <= len(data):
        raise UserInputError(f"n_examples must be in 1..{len(data)} (the {split} split), got {n}")
    if not isinstance(block_size, int) or block_size < 1:
        raise UserInputError(f"block_size must be a positive integer, got {block_size!r}")
    info = lake.group(run_id).attrs
    n_params = int(lake.group(run_id)["theta"].shape[1])
    n_classes = int(info["num_classes"])
    rows_per_example = 1 if pef_kind == "diag" else (top_k_classes or max_classes or n_classes)
    if storage == "topk":
        if k is None or k < 1:
            raise UserInputError(f"k must be a positive integer with storage=topk, got {k!r}")
        k = min(int(k), n_params * rows_per_example)
    config = {
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": n,
        "pef_kind": pef_kind,
        "k": k if storage == "topk" else None,
        "storage": storage,
        "min_prob": min_prob,
        "top_k_classes": top_k_classes,
        "max_classes": max_classes,
        "block_size": block_size,
    }
    writer = lake.begin("pefs", config, [run_id])
    if writer.complete:
        return writer.id
    with writer:
        rows = (block_size,)
        outputs = {
            "logits": writer.create_array("logits", (n, n_classes), chunks=(block_size, n_classes)),
            "dense_norm": writer.create_array("dense_norm", (n,), chunks=rows),
        }
        if storage == "topk":
            index_dtype = "int32" if n_params < 2**31 else "int64"
            outputs["values"] = writer.create_array(
                "values", (n, k), "float32", chunks=(block_size, k)
            )
            outputs["indices"] = writer.create_array(
                "indices", (n, k), index_dtype, chunks=(block_size, k)
            )
            if pef_kind != "diag":
                outputs["class_index"] = writer.create_array(
                    "class_index", (n, k), "int32", chunks=(block_size, k)
                )
        elif pef_kind == "diag":
            outputs["dense"] = writer.create_array(
                "dense", (n, n_params), "float32", chunks=(block_size, n_params)
            )
        else:
            shape = (n, rows_per_example, n_params)
            outputs["factors"] = writer.create_array(
                "factors", shape, "float32", chunks=(block_size, *shape[1:])
            )
        if pef_kind == "lvrm":
            outputs["rank"] = writer.create_array("rank", (n,), "int64", chunks=rows)
        n_blocks = -(-n // block_size)
        done = writer.progress("blocks", n_blocks)
        options = {
            "pef_kind": pef_kind,
            "k": k,
            "storage": storage,
            "min_prob": min_prob,
            "top_k_classes": top_k_classes,
            "max_classes": max_classes,
        }
        tasks = [
            (
                lake.url,
                run_id,
                checkpoint,
                split,
                slice(b * block_size, min(n, (b + 1) * block_size)),
                outputs,
                done.array,
                b,
                options,
            )
            for b in done.pending()
        ]
        run_tasks(_pef_block, tasks, description=f"{pef_kind} PEFs", progress=progress)
        writer.write("label", data.y[:n])
        writer.write("sample_id", data.sample_id[:n])
        writer.set_attrs(
            pef_kind=pef_kind,
            storage=storage if (storage == "topk" or pef_kind == "diag") else "dense_factors",
            n_parameters=n_params,
            num_classes=n_classes,
            run=run_id,
            checkpoint=checkpoint,
            split=split,
        )
    return writer.commit()


def _dsf_block(lake_url, run_id, checkpoint, split, rows: slice, mode: str, seed: int):
    model = cached_model(lake_url, run_id, checkpoint)
    x = torch.as_tensor(cached_run_splits(lake_url, run_id).split(split).x[rows])
    total, count = kernels.dataset_fisher_diag_sum(
        model,
        x,
        mode=mode,
        seed=seed,
        example_offset=rows.start,
        dtype=torch.float64,
        device=torch_device(),
    )
    return total.cpu().numpy(), count


def run_dsf(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    split: str = "train",
    n_examples: int | None = None,
    mode: str = "expectation",
    seed: int = 0,
    block_size: int = 256,
    progress: bool = True,
) -> str:
    """Dataset-level diagonal Fisher (mean D-PEF, or sampled-label Fisher) as a ``dsf`` artifact.

    Block sums are computed as tasks and added in float64 in block order, so the result does
    not depend on the cluster; sampled labels are drawn per example from ``(seed, example)``.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    data = _check_run(lake, run_id, split, checkpoint)
    checkpoint %= lake.group(run_id)["theta"].shape[0]
    if mode not in ("expectation", "sampling"):
        raise UserInputError(f"mode={mode!r} is not one of: expectation, sampling")
    n = len(data) if n_examples is None else int(n_examples)
    if not 1 <= n <= len(data):
        raise UserInputError(f"n_examples must be in 1..{len(data)}, got {n}")
    config = {
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": n,
        "mode": mode,
        "seed": seed if mode == "sampling" else None,
    }
    writer = lake.begin("dsf", config, [run_id])
    if writer.complete:
        return writer.id
    blocks = [slice(s, min(n, s + block_size)) for s in range(0, n, block_size)]
    sums: dict[int, np.ndarray] = {}

    def collect(args, result):
        sums[args[4].start] = result

    run_tasks(
        _dsf_block,
        [(lake.url, run_id, checkpoint, split, rows, mode, seed) for rows in blocks],
        description="DSF",
        on_result=collect,
        progress=progress,
    )
    total = sum(sums[start][0] for start in sorted(sums))
    count = sum(sums[start][1] for start in sorted(sums))
    fisher = total / count
    writer.write("fisher", fisher.astype(np.float32))
    writer.set_attrs(
        mode=mode,
        n_examples=int(count),
        run=run_id,
        checkpoint=checkpoint,
        n_parameters=int(fisher.size),
    )
    return writer.commit()


def run_filter(
    lake: Lake | str,
    pefs_id: str,
    *,
    incorrect_only: bool = False,
    labels: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
) -> str:
    """A new ``pefs`` artifact with only the selected examples of ``pefs_id``."""
    lake = open_lake(lake) if isinstance(lake, str) else lake
    source = lake.open(pefs_id)
    if source.attrs.get("curvlake:kind") != "pefs":
        raise UserInputError(f"{pefs_id} is not a pefs artifact")
    if not (incorrect_only or labels is not None or indices is not None):
        raise UserInputError("give at least one filter: incorrect_only, labels or indices")
    n = source.sizes["example"]
    if indices is not None and any(not 0 <= int(i) < n for i in indices):
        raise UserInputError(f"indices must be in 0..{n - 1}")
    keep = kernels.filter_examples(
        source["logits"].values,
        source["label"].values,
        incorrect_only=incorrect_only,
        labels_in=labels,
        indices=indices,
    )
    if keep.size == 0:
        raise UserInputError("the filter keeps no example")
    config = {
        "incorrect_only": bool(incorrect_only),
        "labels": None if labels is None else sorted(int(v) for v in labels),
        "indices": None if indices is None else sorted(int(v) for v in indices),
    }
    writer = lake.begin("pefs", config, [pefs_id])
    if writer.complete:
        return writer.id
    for name, variable in source.variables.items():
        if "example" in variable.dims:
            writer.write(name, variable.values[keep])
    writer.set_attrs(
        **{
            k: v
            for k, v in source.attrs.items()
            if not k.startswith("curvlake:") and k != "coordinates"
        },
        filtered_from=pefs_id,
    )
    return writer.commit()
