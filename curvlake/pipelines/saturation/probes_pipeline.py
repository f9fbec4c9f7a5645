"""Linear probes of every layer of a latents artifact, fitted out of core: ``run_probes``.

A layer's latents need never be in memory together: the solver reads them block by block.

1. Standardization: one Dask pass over the training blocks computes per-block count, mean and
   (diagonal) centred sum of squares of every selected layer's features (merged exactly as in
   :mod:`~curvlake.pipelines.saturation.moments`, Chan et al. 1979), stored per block in the
   staging work area so a killed run resumes the pass.
2. Fitting: one :func:`~curvlake.pipelines.saturation.probes.fit_probe` (scikit-learn's L-BFGS
   objective, same optimum as ``LogisticRegression(C=C)`` on the standardized features) per
   layer, each in its own thread. Their loss-and-gradient requests are answered together: each
   round is one Dask pass over the training blocks computing
   :func:`~curvlake.pipelines.saturation.probes.block_loss_grad` for every waiting layer, the
   block sums added in block order (so the result does not depend on the worker count). A
   layer's fitted probe is stored as soon as it converges; a killed run refits only the layers
   not stored.
3. Accuracy: one pass over every split's blocks.

The validation rows are the latents' ``val`` split when it has one; otherwise a seeded random
share ``val_fraction`` of the training rows is held out (not fitted on, not standardized
with).
"""

from __future__ import annotations

import functools
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from curvlake._array import get_namespace, to_numpy
from curvlake.engine import current_client, run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake, open_lake
from curvlake.pipelines.saturation.probes import (
    LossGrad,
    ProbeFit,
    block_loss_grad,
    fit_probe,
    predict,
    standardization,
)
from curvlake.pipelines.saturation.tracking import MomentsTree, require_work_array
from curvlake.pipelines.skeleton import POSITIVE_INT, SEED, as_lake, block_slices, require_artifact
from curvlake.validation import Interval, refuse_unused, validate_params

#: Held-out share of the training rows when the latents have no ``val`` split.
DEFAULT_VAL_FRACTION = 0.1


@dataclass
class DiagonalMoments:
    """Count, mean and per-feature centred sum of squares (the diagonal of ``Moments.m2``).

    What standardization needs, in ``O(d)`` instead of ``Moments``' ``O(d^2)``; merged with the
    same pairwise update (Chan et al. 1979). ``standardization`` accepts it in place of
    ``Moments``.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def from_batch(cls, x: Any) -> DiagonalMoments:
        """Of the rows of an ``(n, d)`` NumPy or CuPy block (float64 on its device)."""
        xp = get_namespace(x)
        x = xp.asarray(x, dtype=xp.float64)
        if x.shape[0] == 0:
            return cls(0, np.zeros(x.shape[1]), np.zeros(x.shape[1]))
        mean = x.mean(axis=0)
        return cls(int(x.shape[0]), to_numpy(mean), to_numpy(((x - mean) ** 2).sum(axis=0)))

    def merge(self, other: DiagonalMoments) -> DiagonalMoments:
        if other.count == 0:
            return DiagonalMoments(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return DiagonalMoments(other.count, other.mean.copy(), other.m2.copy())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.square(delta) * (float(self.count) * other.count / n)
        return DiagonalMoments(n, mean, m2)

    def variance(self, ddof: int) -> np.ndarray:
        if self.count <= ddof:
            raise UserInputError(f"variance with ddof={ddof} needs more than {ddof} rows")
        return self.m2 / (self.count - ddof)


@dataclass(frozen=True)
class _Layer:
    """A probed layer: its columns in the latents and in the probe's ``feature`` axis."""

    index: int
    name: str
    start: int  # first column in the latents
    width: int
    offset: int  # first column among the probed layers


@functools.lru_cache(maxsize=8)
def _features(lake_url: str, latents_id: str, name: str):
    return open_lake(lake_url).group(latents_id)[name]


def _columns(block: np.ndarray, layer: _Layer, lo: int) -> np.ndarray:
    return block[:, layer.start - lo : layer.start - lo + layer.width]


#: Share of a process's memory (a worker's limit, else the available memory) that decoded
#: blocks may keep between passes.
CACHE_SHARE = 0.15
_BLOCKS: dict[tuple, np.ndarray] = {}
_BLOCKS_LOCK = threading.Lock()


def _cache_budget() -> int:
    import psutil

    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    return int(CACHE_SHARE * (limit or psutil.virtual_memory().available))


def _read(ref: tuple, rows: slice) -> tuple[np.ndarray, int]:
    """Rows of a split's features, only the column range of the probed layers.

    Every solver iteration reads every block again, so blocks stay decoded in this process
    while they fit in ``CACHE_SHARE`` of its memory; the first blocks are kept and later ones
    read each time, so latents larger than memory cost a bounded cache, never more.
    """
    lake_url, latents_id, name, lo, hi = ref
    key = (*ref, rows.start, rows.stop)
    with _BLOCKS_LOCK:
        cached = _BLOCKS.get(key)
    if cached is not None:
        return cached, lo
    block = np.asarray(_features(lake_url, latents_id, name)[rows, lo:hi])
    with _BLOCKS_LOCK:
        used = sum(b.nbytes for b in _BLOCKS.values())
        if used + block.nbytes <= _cache_budget():
            _BLOCKS[key] = block
    return block, lo


def _moments_task(ref, rows, fit_rows, layers, arrays, done, block: int) -> int:
    x, lo = _read(ref, rows)
    x = x[fit_rows]
    parts = [DiagonalMoments.from_batch(_columns(x, layer, lo)) for layer in layers]
    arrays["count"][block] = np.array([p.count for p in parts], dtype=np.int64)
    arrays["mean"][block] = np.concatenate([p.mean for p in parts])
    arrays["m2"][block] = np.concatenate([p.m2 for p in parts])
    done[block] = 1
    return block


def _loss_grad_task(ref, rows, fit_rows, labels, payload, block: int) -> dict[int, LossGrad]:
    x, lo = _read(ref, rows)
    x, y = x[fit_rows], labels[fit_rows]
    mean, scale = payload["mean"], payload["scale"]
    return {
        layer.index: block_loss_grad(
            coef, intercept, _columns(x, layer, lo), y, mean[layer.index], scale[layer.index]
        )
        for layer, (coef, intercept) in payload["requests"]
    }


def _correct_task(ref, rows, groups, labels, payload, key: int) -> np.ndarray:
    """Correct predictions and counts per (row group, layer): ``(groups, layers, 2)``."""
    x, lo = _read(ref, rows)
    out = np.zeros((len(groups), len(payload["layers"]), 2), dtype=np.int64)
    for layer_at, layer in enumerate(payload["layers"]):
        coef, intercept, mean, scale = payload["params"][layer.index]
        predicted = predict(coef, intercept, _columns(x, layer, lo), mean, scale)
        for g, member in enumerate(groups):
            out[g, layer_at] = (np.sum(predicted[member] == labels[member]), np.sum(member))
    return out


def _share(payload: Any) -> Any:
    """``payload`` as one broadcast Dask future when a cluster runs the tasks."""
    client = current_client()
    if client is None:
        return payload
    # in a list: a scattered dict would be stored under its keys, the same in every pass
    return client.scatter([payload], broadcast=True, hash=False)[0]


class _Aborted(Exception):
    """Raised in a layer's thread when the fit of another layer failed."""


class _Lockstep:
    """Answers the loss-and-gradient requests of several L-BFGS threads in rounds.

    A round starts when every live thread waits for an answer; the coordinator then makes one
    data pass for all of them (:meth:`next_round`, :meth:`answer`).
    """

    def __init__(self, layers: list[int]) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._answers: dict[int, LossGrad] = {}
        self._live = set(layers)
        self._error: BaseException | None = None

    def evaluator(self, layer: int) -> Callable[[np.ndarray, np.ndarray], LossGrad]:
        def evaluate(coef: np.ndarray, intercept: np.ndarray) -> LossGrad:
            with self._cond:
                self._waiting[layer] = (coef.copy(), intercept.copy())
                self._cond.notify_all()
                while layer not in self._answers:
                    if self._error is not None:
                        raise _Aborted
                    self._cond.wait()
                return self._answers.pop(layer)

        return evaluate

    def finished(self, layer: int) -> None:
        with self._cond:
            self._live.discard(layer)
            self._cond.notify_all()

    def next_round(self) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        with self._cond:
            while self._live and len(self._waiting) < len(self._live) and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if not self._live:
                return None
            batch, self._waiting = self._waiting, {}
            return batch

    def answer(self, results: dict[int, LossGrad]) -> None:
        with self._cond:
            self._answers.update(results)
            self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()


def select_layers(names: list[str], pattern: str | None) -> list[int]:
    """Indices of the latents' layers whose names ``pattern`` matches (``re.search``)."""
    if pattern is None:
        return list(range(len(names)))
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise UserInputError(
            f"layer pattern {pattern!r} is not a regular expression: {error}"
        ) from None
    chosen = [i for i, name in enumerate(names) if regex.search(name)]
    if not chosen:
        raise UserInputError(
            f"layer pattern {pattern!r} matches no layer of the latents (known: {', '.join(names)})"
        )
    return chosen


@validate_params(
    {
        "C": [Interval(float, 0, None, closed="neither")],
        "tol": [Interval(float, 0, None, closed="neither")],
        "max_iter": POSITIVE_INT,
        "val_fraction": [None, Interval(float, 0, 1, closed="left")],
        "seed": SEED,
        "block_size": [None, *POSITIVE_INT],
    }
)
def run_probes(
    lake: Lake | str,
    latents_id: str,
    *,
    layers: str | None = None,
    C: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    val_fraction: float | None = None,
    seed: int = 0,
    block_size: int | None = None,
    progress: bool = True,
) -> str:
    """Fit one logistic-regression probe per layer of ``latents_id`` (module order).

    Args:
        lake: the lake (or its URL).
        latents_id: a ``latents`` artifact with a ``train`` split.
        layers: regular expression selecting layers (None: all).
        C: inverse L2 strength, as scikit-learn's (> 0; ``inf``: no penalty).
        tol: L-BFGS gradient tolerance, as scikit-learn's ``tol``.
        max_iter: L-BFGS iterations, as scikit-learn's ``max_iter``.
        val_fraction: share of the training rows held out for validation when the latents
            have no ``val`` split (default 0.1; 0: no validation); not with a ``val`` split.
        seed: seed of the held-out rows.
        block_size: examples per task (None: the stored chunk rows).

    Returns:
        The ``probes`` artifact id.
    """
    lake = as_lake(lake)
    require_artifact(lake, latents_id, "latents", role="latents")
    group = lake.group(latents_id)
    splits = list(group.attrs["splits"])
    if "train" not in splits:
        raise UserInputError(f"latents {latents_id} have no train split to fit probes on")
    if "val" in splits:
        refuse_unused("to latents with a val split (the validation set)", val_fraction=val_fraction)
    elif val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    names = [str(n) for n in group["layer"][:]]
    starts = np.asarray(group["feature_offset"][:])
    widths = np.asarray(group["n_features"][:])
    chosen = select_layers(names, layers)
    offsets = np.concatenate([[0], np.cumsum(widths[chosen])[:-1]]).astype(int)
    probed = [
        _Layer(i, names[at], int(starts[at]), int(widths[at]), int(offsets[i]))
        for i, at in enumerate(chosen)
    ]
    lo = min(layer.start for layer in probed)
    hi = max(layer.start + layer.width for layer in probed)
    total = int(widths[chosen].sum())
    train = group["train_features"]
    n_train = int(train.shape[0])
    if block_size is None:
        block_size = int(train.chunks[0])
    blocks = block_slices(n_train, block_size)

    labels_raw = {split: np.asarray(group[f"{split}_label"][:]) for split in splits}
    held_out = np.zeros(n_train, dtype=bool)
    if "val" not in splits and val_fraction:
        n_val = round(val_fraction * n_train)
        held_out[np.random.default_rng(seed).permutation(n_train)[:n_val]] = True
    fit_labels = labels_raw["train"][~held_out]
    classes = np.unique(fit_labels)
    if classes.size < 2:
        raise UserInputError(
            f"the training rows of latents {latents_id} hold {classes.size} class(es); a probe "
            "needs at least 2"
        )
    if (~held_out).sum() < 1:
        raise UserInputError("no training rows are left after holding out the validation rows")
    encoded = {
        split: np.where(np.isin(y, classes), np.searchsorted(classes, y), -1).astype(np.int64)
        for split, y in labels_raw.items()
    }

    config = {
        "layers": layers,
        "C": float(C),
        "tol": float(tol),
        "max_iter": int(max_iter),
        "val_fraction": None if "val" in splits else float(val_fraction),
        "seed": int(seed),
        "block_size": int(block_size),
    }
    writer = lake.begin("probes", config, [latents_id])
    if writer.complete:
        return writer.id
    with writer:
        ref = {s: (lake.url, latents_id, f"{s}_features", lo, hi) for s in splits}
        mean, scale = _standardize(writer, ref["train"], blocks, held_out, probed, total, progress)
        rows = 1 if classes.size == 2 else int(classes.size)
        fitted = _fit_all(
            writer,
            ref["train"],
            blocks,
            held_out,
            encoded["train"],
            probed,
            (mean, scale),
            {
                "C": C,
                "tol": tol,
                "max_iter": max_iter,
                "rows": rows,
                "total": total,
                "n_classes": int(classes.size),
            },
        )
        accuracy = _accuracies(
            ref, splits, held_out, encoded, probed, fitted, (mean, scale), block_size
        )
        writer.write_many(
            {
                "layer": np.array([layer.name for layer in probed], dtype=object),
                "feature_offset": offsets.astype(np.int64),
                "n_features": widths[chosen].astype(np.int64),
                "intercept": np.stack([fitted[layer.index][0].intercept for layer in probed]),
                "mean": mean,
                "scale": scale,
                **accuracy,
                "n_iter": np.array([fitted[x.index][0].n_iter for x in probed], dtype=np.int64),
                "n_evaluations": np.array(
                    [fitted[x.index][0].n_evaluations for x in probed], dtype=np.int64
                ),
                "converged": np.array([fitted[x.index][0].converged for x in probed]),
                "objective": np.array([fitted[x.index][0].objective for x in probed]),
            }
        )
        _BLOCKS.clear()  # this process's; workers keep theirs within their budget
        writer.set_attrs(
            source="fit",
            C=float(C),
            tol=float(tol),
            max_iter=int(max_iter),
            num_classes=int(classes.size),
            classes=[int(c) for c in classes],
            validation="val split"
            if "val" in splits
            else (f"held-out share {val_fraction:g} of train" if val_fraction else "none"),
            n_fit=int((~held_out).sum()),
            messages=[fitted[layer.index][1] for layer in probed],
            solver="L-BFGS-B (scikit-learn's lbfgs objective), one data pass per evaluation",
        )
    return writer.commit()


def _standardize(writer, ref, blocks, held_out, probed, total, progress):
    """Mean and scale of the probed features over the fitted training rows (pass 1)."""
    work = writer.work_group("moments")
    n_layers = len(probed)
    arrays = {
        "count": require_work_array(work, "count", (len(blocks), n_layers), "int64", (1, n_layers)),
        "mean": require_work_array(work, "mean", (len(blocks), total), "float64", (1, total)),
        "m2": require_work_array(work, "m2", (len(blocks), total), "float64", (1, total)),
    }
    done = writer.progress("moments", len(blocks))
    tasks = [
        (ref, blocks[b], ~held_out[blocks[b]], probed, arrays, done.array, b)
        for b in done.pending()
    ]
    run_tasks(_moments_task, tasks, description="probe moments", progress=progress)
    trees = [MomentsTree() for _ in probed]
    for b in range(len(blocks)):
        count, mean, m2 = (np.asarray(arrays[name][b]) for name in ("count", "mean", "m2"))
        for i, layer in enumerate(probed):
            cols = slice(layer.offset, layer.offset + layer.width)
            trees[i].push(DiagonalMoments(int(count[i]), mean[cols], m2[cols]))
    pairs = [standardization(tree.result()) for tree in trees]
    return np.concatenate([m for m, _ in pairs]), np.concatenate([s for _, s in pairs])


def _fit_all(writer, ref, blocks, held_out, labels, probed, standard, options):
    """Fit every probed layer's probe in lockstep (pass 2); ``{index: (ProbeFit, message)}``."""
    rows, total = options["rows"], options["total"]
    work = writer.work_group("fits")
    n_layers = len(probed)
    coef = writer.create_array("coef", (rows, total), "float64")
    small = {
        "intercept": require_work_array(work, "intercept", (n_layers, rows), "float64", (1, rows)),
        "numbers": require_work_array(work, "numbers", (n_layers, 4), "float64", (1, 4)),
    }
    done = writer.progress("layers", n_layers)
    mean, scale = standard
    layer_mean = {x.index: mean[x.offset : x.offset + x.width] for x in probed}
    layer_scale = {x.index: scale[x.offset : x.offset + x.width] for x in probed}
    fitted: dict[int, tuple[ProbeFit, str]] = {}
    messages = dict(work.attrs.get("messages", {}))
    for layer in probed:
        if done.done()[layer.index]:
            n_iter, n_eval, converged, objective = np.asarray(small["numbers"][layer.index])
            fitted[layer.index] = (
                ProbeFit(
                    coef=np.asarray(coef[:, layer.offset : layer.offset + layer.width]),
                    intercept=np.asarray(small["intercept"][layer.index]),
                    n_iter=int(n_iter),
                    converged=bool(converged),
                    objective=float(objective),
                    n_evaluations=int(n_eval),
                    message=messages.get(str(layer.index), ""),
                ),
                messages.get(str(layer.index), ""),
            )
    pending = [layer for layer in probed if layer.index not in fitted]
    lockstep = _Lockstep([layer.index for layer in pending])
    results: queue.Queue = queue.Queue()

    def fit(layer: _Layer) -> None:
        try:
            probe = fit_probe(
                lockstep.evaluator(layer.index),
                layer.width,
                options["n_classes"],
                C=options["C"],
                tol=options["tol"],
                max_iter=options["max_iter"],
            )
            results.put((layer, probe))
        except _Aborted:
            pass
        except BaseException as error:  # surfaced by the coordinator
            lockstep.abort(error)
        finally:
            lockstep.finished(layer.index)

    def store_finished() -> None:
        while not results.empty():
            layer, probe = results.get()
            coef[:, layer.offset : layer.offset + layer.width] = probe.coef
            small["intercept"][layer.index] = probe.intercept
            small["numbers"][layer.index] = [
                probe.n_iter,
                probe.n_evaluations,
                float(probe.converged),
                probe.objective,
            ]
            messages[str(layer.index)] = probe.message
            work.attrs["messages"] = messages
            done.mark_done(layer.index)  # last: a layer counts once its probe is stored
            fitted[layer.index] = (probe, probe.message)

    threads = [threading.Thread(target=fit, args=(layer,), daemon=True) for layer in pending]
    for thread in threads:
        thread.start()
    try:
        while True:
            batch = lockstep.next_round()
            store_finished()
            if batch is None:
                break
            by_layer = {layer.index: layer for layer in pending}
            payload = _share(
                {
                    "requests": [(by_layer[i], batch[i]) for i in sorted(batch)],
                    "mean": {i: layer_mean[i] for i in batch},
                    "scale": {i: layer_scale[i] for i in batch},
                }
            )
            parts: dict[int, dict[int, LossGrad]] = {}

            def collect(args, result, parts=parts) -> None:
                parts[args[-1]] = result

            tasks = [
                (ref, rows_, ~held_out[rows_], labels[rows_], payload, b)
                for b, rows_ in enumerate(blocks)
            ]
            run_tasks(
                _loss_grad_task,
                tasks,
                description="probe pass",
                on_result=collect,
                progress=False,
            )
            totals = {}
            for i in batch:
                total_part = parts[0][i]
                for b in range(1, len(blocks)):  # block order: worker-count invariant
                    total_part = total_part + parts[b][i]
                totals[i] = total_part
            lockstep.answer(totals)
    except BaseException as error:
        lockstep.abort(error)
        raise
    finally:
        for thread in threads:
            thread.join()
    store_finished()
    return fitted


def _accuracies(ref, splits, held_out, encoded, probed, fitted, standard, block_size):
    """Train (fitted rows) / val / test accuracy of every probe (pass 3)."""
    mean, scale = standard
    payload = _share(
        {
            "layers": probed,
            "params": {
                x.index: (
                    fitted[x.index][0].coef,
                    fitted[x.index][0].intercept,
                    mean[x.offset : x.offset + x.width],
                    scale[x.offset : x.offset + x.width],
                )
                for x in probed
            },
        }
    )
    tasks, keys = [], []
    for split in splits:
        for rows in block_slices(len(encoded[split]), block_size):
            if split == "train":
                groups = [~held_out[rows], held_out[rows]]
            else:
                groups = [np.ones(rows.stop - rows.start, dtype=bool)]
            tasks.append((ref[split], rows, groups, encoded[split][rows], payload, len(keys)))
            keys.append(split)
    counts = {split: np.zeros((2 if split == "train" else 1, len(probed), 2), np.int64)
              for split in splits}  # fmt: skip

    def add(args, result) -> None:
        counts[keys[args[-1]]] += result

    run_tasks(_correct_task, tasks, description="probe accuracy", on_result=add, progress=False)

    def share(correct_count: np.ndarray) -> np.ndarray:
        correct, count = correct_count[:, 0], correct_count[:, 1]
        return np.where(count > 0, correct / np.maximum(count, 1), np.nan)

    nan = np.full(len(probed), np.nan)
    val = share(counts["val"][0]) if "val" in splits else share(counts["train"][1])
    return {
        "train_accuracy": share(counts["train"][0]),
        "val_accuracy": val if "val" in splits or held_out.any() else nan,
        "test_accuracy": share(counts["test"][0]) if "test" in splits else nan,
    }
