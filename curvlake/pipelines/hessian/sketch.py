"""Random measurements of a checkpoint's Hessian into the lake: ``run_hessian_sketch``.

The Hessian ``A`` is that of the mean loss over a fixed data subset (:func:`hessian_subset`:
the first ``n`` examples of a split, or a class-balanced draw), in eval mode. A *round* is a set
of columns ``V`` whose products ``A V`` are independent of each other; it is cut into blocks of
columns, and each block is one Dask task that loads the model and the subset
(:func:`~curvlake.pipelines.skeleton.load_block`), multiplies its columns in **one data pass**
(batched HVPs of :class:`~curvlake.autodiff.CurvatureOperator`) and writes the whole chunks of
its columns, then marks them in the round's per-column status record. A killed run, rerun,
recomputes only the columns not marked.

What a round multiplies (see :mod:`~curvlake.pipelines.hessian.recovery` for the modes):

============== ==========================================================================
recycled       round 0: Ψ (``s`` columns; the first ``k`` products are the outer sketch)
oversampled    round 0: Ω (``k``) and Ψ (``s``)
nystrom,       round 0: Ω (``k``)
singlepass
hmt            round 0: Ω; then per power iteration two rounds ``Y ← A orth(Y)``; then
               ``Q = orth(Y)`` and a last round ``A Q`` (``2 + 2q`` rounds)
krylov         round 0: Ω (``Y = A Ω``, stored as ``outer``); ``Q_0 = orth(Y)``; then per
               block ``j = 0..q`` a round ``A Q_j``, and (before the next one) ``Q_{j+1}`` =
               the last ``k`` columns of a TSQR of ``[Q_0 … Q_j | A Q_j]`` (``2 + q``
               rounds). The blocks sit side by side in ``krylov_basis`` /
               ``krylov_image``, so the block size must divide ``k`` (each task still
               writes whole chunks)
============== ==========================================================================

plus, in round 0, the ``q`` Gaussian probes of the a-posteriori error estimate. The columns of
Ψ produce the inner sketch on the fly: the task that computes ``A Ψ[:, j0:j1]`` (``D × b``) also
projects it, ``Φᵀ (A Ψ[:, j0:j1])`` (``s × b``, float64), so no ``(D, s)`` array is stored. The
``orth`` steps of HMT are Dask TSQRs over the row blocks of the stored sketch
(:mod:`~curvlake.pipelines.hessian._tall`). Test matrices are counter based
(:class:`~curvlake.pipelines.hessian.test_matrices.RandomTestMatrix`): a column does not depend
on the block it is computed in, the worker or the order. Every task records its operator's
counters, and their sum is checked against :func:`~curvlake.pipelines.hessian.recovery.budget`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from curvlake.constants import HESSIAN_NOISES, HESSIAN_RECOVERIES
from curvlake.engine import run_tasks
from curvlake.errors import LakeError, UserInputError
from curvlake.lake import ArtifactWriter, Lake, create_work_array
from curvlake.nn.params import table_arrays
from curvlake.pipelines.hessian._tall import (
    orthonormalize_into,
    param_block_rows,
    tall,
    transpose_columns,
)
from curvlake.pipelines.hessian.recovery import budget, check_sketch_config
from curvlake.pipelines.hessian.test_matrices import RandomTestMatrix
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    SPLIT,
    RunInput,
    as_lake,
    load_block,
    resolve_run,
)
from curvlake.validation import Interval, Options, validate_params

#: Gaussian probes of the a-posteriori error estimate, when not given (the seed's 30).
DEFAULT_PROBES = 30
#: Columns per task at most, when the block size is not given.
MAX_AUTO_BLOCK = 32
_INNER_MODES = ("recycled", "oversampled")
#: torch.func's forward-mode AD levels are global to the process and functional_call swaps
#: tensors into the shared cached model, so two threads of one worker must not multiply at
#: once (each product uses all cores through torch's own threads anyway).
_HVP_LOCK = threading.Lock()


# -- the data subset ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HessianSubset:
    """The examples a Hessian averages over: ``rows`` of ``split`` (what tasks load)."""

    split: str
    rows: slice | np.ndarray
    sample_id: np.ndarray

    @property
    def n(self) -> int:
        return int(self.sample_id.size)


def balanced_rows(labels: np.ndarray, n: int, num_classes: int, seed: int) -> np.ndarray:
    """``n`` example indices with the classes as equal as possible, drawn with ``seed``.

    Class ``c`` gets ``n // C`` examples, plus one for the first ``n % C`` classes; they are
    the first of a permutation of the class's examples drawn from
    ``default_rng([seed, c, n, 0x62616c])`` (counter based: one stream per class). Sorted.

    Raises:
        UserInputError: when a class has too few examples.
    """
    counts = np.full(num_classes, n // num_classes)
    counts[: n % num_classes] += 1
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size < counts[c]:
            raise UserInputError(
                f"a class-balanced subset of {n} examples needs {counts[c]} of class {c}, the "
                f"split has {members.size}; lower --n-examples or drop --balanced"
            )
        order = np.random.default_rng([seed, c, n, 0x62616C]).permutation(members.size)
        chosen.append(members[order[: counts[c]]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def hessian_subset(
    run: RunInput, split: str, n_examples: int | None, balanced: bool, seed: int
) -> HessianSubset:
    """The first ``n_examples`` of ``split`` (all by default), or a class-balanced draw."""
    data = run.split(split)
    if not balanced:
        n = run.n_rows(split, n_examples)
        return HessianSubset(split, slice(0, n), np.asarray(data.sample_id[:n]))
    if n_examples is None:
        raise UserInputError("--balanced needs --n-examples N (the size of the subset)")
    n = run.n_rows(split, n_examples)
    rows = balanced_rows(np.asarray(data.y), n, run.num_classes, seed)
    return HessianSubset(split, rows, np.asarray(data.sample_id[rows]))


# -- the measurement tasks ---------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityColumns:
    """Columns of the ``D × D`` identity (the exact method measures the dense Hessian)."""

    dim: int

    def columns(self, start: int, stop: int, dtype: Any = np.float64) -> np.ndarray:
        out = np.zeros((self.dim, stop - start), dtype=dtype)
        out[np.arange(start, stop), np.arange(stop - start)] = 1
        return out


@dataclass(frozen=True)
class StoredColumns:
    """Columns of a stored ``(param, column)`` array (the HMT bases)."""

    array: Any

    def columns(self, start: int, stop: int, dtype: Any = np.float64) -> np.ndarray:
        return np.asarray(self.array[:, start:stop], dtype=dtype)


@dataclass(frozen=True)
class ColumnWindow:
    """Columns ``[start, start + width)`` of a stored ``(param, column)`` array, addressed from
    0: one Krylov block of ``krylov_basis`` / ``krylov_image`` (a source, a task's target, a
    Dask array and a ``da.store`` target)."""

    array: Any
    start: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), self.width)

    @property
    def dtype(self) -> Any:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return 2

    def _columns(self, key: tuple) -> tuple:
        rows, cols = key
        lo, hi, step = cols.indices(self.width)
        if step != 1:
            raise ValueError("a column window takes contiguous column slices")
        return rows, slice(self.start + lo, self.start + hi)

    def __getitem__(self, key: tuple) -> Any:
        return self.array[self._columns(key)]

    def __setitem__(self, key: tuple, value: Any) -> None:
        self.array[self._columns(key)] = value


@dataclass(frozen=True)
class HvpContext:
    """What every task of one Hessian loads: the checkpoint and the data subset."""

    lake_url: str
    run_id: str
    checkpoint: int
    split: str
    rows: slice | np.ndarray
    dtype: str
    batch_size: int | None


@dataclass(frozen=True)
class Piece:
    """Columns ``[start, stop)`` of one source of a round, and where their products go.

    Attributes:
        source: the vectors (``.columns(start, stop, dtype)``).
        start, stop: the columns of the source.
        writes: ``(target, column, lo, hi)``: ``target[:, column : column + hi - lo]`` receives
            columns ``lo:hi`` of the piece's products (whole chunks of the target).
        inner: ``(Φ, inner)``: ``inner[:, start:stop] = Φᵀ (A V)`` (float64), or None.
        status_range: the columns of the round's status record this piece marks.
    """

    source: Any
    start: int
    stop: int
    writes: tuple[tuple[Any, int, int, int], ...]
    inner: tuple[Any, Any] | None
    status_range: tuple[int, int]


@dataclass(frozen=True)
class Measurement:
    """One task: ``A V`` for the columns of its pieces, all multiplied in one data pass.

    Attributes:
        pieces: the columns multiplied (block ``i`` of every source of the round).
        status: the round's per-column status array.
        counters: the ``(task, 2)`` work array of (HVPs, data passes), and this task's row.
    """

    pieces: tuple[Piece, ...]
    status: Any
    counters: Any
    counter_row: int


def _as_array(tensor: Any) -> Any:
    """A torch tensor as an array of its device (CuPy on CUDA, NumPy on the host)."""
    if tensor.is_cuda:
        import cupy

        return cupy.from_dlpack(tensor.detach())
    return tensor.detach().numpy()


def measure_block(context: HvpContext, task: Measurement) -> int:
    """Run one :class:`Measurement` (a Dask task): load, multiply, write, mark."""
    import torch

    from curvlake._array import to_numpy
    from curvlake.autodiff import CurvatureOperator

    block = load_block(
        context.lake_url,
        context.run_id,
        context.checkpoint,
        context.split,
        context.rows,
        context.dtype,
    )
    torch_dtype = getattr(torch, context.dtype)
    vectors = np.concatenate(
        [piece.source.columns(piece.start, piece.stop, np.float64) for piece in task.pieces],
        axis=1,
    )
    with _HVP_LOCK:
        operator = CurvatureOperator(
            block.model,
            block.x,
            block.y,
            kind="hessian",
            dtype=torch_dtype,
            device=block.device,
            batch_size=context.batch_size,
        )
        image = operator.matmat(torch.as_tensor(vectors).to(device=block.device, dtype=torch_dtype))
    host = image.cpu().numpy()
    offset = 0
    for piece in task.pieces:
        width = piece.stop - piece.start
        for target, column, lo, hi in piece.writes:
            target[:, column : column + hi - lo] = host[:, offset + lo : offset + hi]
        if piece.inner is not None:
            phi, inner = piece.inner
            product = _as_array(image[:, offset : offset + width])
            inner[:, piece.start : piece.stop] = to_numpy(transpose_columns(phi, product))
        offset += width
    task.counters[task.counter_row] = [operator.n_products, operator.n_passes]
    for piece in task.pieces:
        lo, hi = piece.status_range
        task.status[lo:hi] = 1
    return task.counter_row


# -- planning rounds ---------------------------------------------------------------------------


@dataclass
class Round:
    """The pending tasks of one round."""

    name: str
    tasks: list[Measurement] = field(default_factory=list)


def tasks_per_round(segments: Sequence[int], block: int) -> int:
    """Tasks of a round whose sources have ``segments`` columns: task ``i`` takes block ``i``
    of every source."""
    return max(-(-n // block) for n in segments)


class _Planner:
    """Cuts rounds into tasks, numbering their counter rows."""

    def __init__(self, writer: ArtifactWriter, block: int, counters: Any):
        self.writer, self.block, self.counters = writer, block, counters
        self.next_row = 0

    def round(self, name: str, segments: Sequence[tuple]) -> Round:
        """``segments``: ``(source, n_columns, writes_of(start, stop), inner)`` in status order.

        Task ``i`` multiplies columns ``[i b, (i + 1) b)`` of every source, so each task writes
        whole chunks (chunks are ``b`` columns wide) and the round costs one data pass when
        ``b`` covers the largest source. Tasks whose columns are all marked done are skipped
        (resume); their counter rows are kept, so the totals include them.
        """
        sizes = [seg[1] for seg in segments]
        status = self.writer.progress(name, sum(sizes))
        done = status.done()
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        result = Round(name)
        for i in range(tasks_per_round(sizes, self.block)):
            pieces = []
            for (source, n_columns, writes_of, inner), offset in zip(
                segments, offsets, strict=True
            ):
                start, stop = i * self.block, min(n_columns, (i + 1) * self.block)
                if start < stop:
                    status_range = (int(offset + start), int(offset + stop))
                    pieces.append(
                        Piece(
                            source, start, stop, tuple(writes_of(start, stop)), inner, status_range
                        )
                    )
            row = self.next_row
            self.next_row += 1
            if all(done[p.status_range[0] : p.status_range[1]].all() for p in pieces):
                continue
            result.tasks.append(Measurement(tuple(pieces), status.array, self.counters, row))
        return result


def _columns_into(target: Any, limit: int | None = None):
    """``writes_of`` for a source whose columns go to the same columns of ``target`` (the
    first ``limit`` of them)."""

    def writes_of(start: int, stop: int) -> list[tuple[Any, int, int, int]]:
        end = stop if limit is None else min(stop, limit)
        return [(target, start, 0, end - start)] if end > start else []

    return writes_of


def _nowhere(start: int, stop: int) -> list:
    return []


def _work_array(group: Any, name: str, shape: tuple[int, ...], dtype: Any, chunks) -> Any:
    if name in group.array_keys():
        return group[name]
    return create_work_array(group, name, shape, dtype, chunks=chunks)


def run_round(round_: Round, context: HvpContext, progress: bool) -> None:
    """Submit a round's pending tasks."""
    if round_.tasks:
        run_tasks(
            measure_block,
            [(context, task) for task in round_.tasks],
            description=f"Hessian {round_.name.replace('_', ' ')}",
            progress=progress,
        )


def _orthonormalize_stage(
    writer: ArtifactWriter, name: str, y: Any, target: Any, rows: int, last: int | None = None
):
    """``target = orth(y)`` (or its ``last`` columns) by TSQR, once (a one-block progress
    record makes it resumable)."""
    stage = writer.progress(name, 1)
    if stage.pending():
        orthonormalize_into(tall(y, rows), target, last=last)
        stage.mark_done(0)


def _measure_krylov(
    writer: ArtifactWriter,
    planner: _Planner,
    context: HvpContext,
    outer: Any,
    param_array: Any,
    k: int,
    iters: int,
    rows: int,
    progress: bool,
) -> None:
    """The rounds of ``krylov`` after round 0 (module docstring): ``krylov_basis`` holds
    ``[Q_0 … Q_q]``, ``krylov_image`` their products, block ``j`` in columns ``[jk, (j+1)k)``."""
    basis = param_array("krylov_basis", (iters + 1) * k)
    image = param_array("krylov_image", (iters + 1) * k)
    for j in range(iters + 1):
        block = ColumnWindow(basis, j * k, k)
        if j == 0:
            _orthonormalize_stage(writer, "qr_0", outer, block, rows)
        else:
            known = tall(ColumnWindow(basis, 0, j * k), rows)
            newest = tall(ColumnWindow(image, (j - 1) * k, k), rows)
            extended = da.concatenate([known, newest], axis=1)
            _orthonormalize_stage(writer, f"qr_{j}", extended, block, rows, last=k)
        step = planner.round(
            f"round_{j + 1}",
            [(StoredColumns(block), k, _columns_into(ColumnWindow(image, j * k, k)), None)],
        )
        run_round(step, context, progress)


# -- the entry point ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SketchOptions:
    """The checked options of one sketch (the config of its artifact, resolved)."""

    recovery: str
    noise: str
    k: int
    s: int | None
    power_iters: int
    n_probes: int
    seed: int
    block_size: int
    param_block_size: int
    dtype: str
    batch_size: int | None


def resolve_block_size(block_size: int | None, n_params: int, dtype: str, chunk_bytes: int) -> int:
    """Columns per task: given, or as many as keep one ``(D, b)`` chunk within the lake's
    chunk budget (at most :data:`MAX_AUTO_BLOCK`)."""
    if block_size is not None:
        return int(block_size)
    itemsize = np.dtype(dtype).itemsize
    return int(max(1, min(MAX_AUTO_BLOCK, chunk_bytes // (itemsize * max(1, n_params)))))


def _sketch_options(
    run: RunInput,
    chunk_bytes: int,
    *,
    recovery: str,
    noise: str,
    k: int,
    s: int | None,
    power_iters: int | None,
    probes: int | None,
    seed: int,
    block_size: int | None,
    param_block_size: int | None,
    dtype: str,
    batch_size: int | None,
) -> SketchOptions:
    """Check a sketch's sizes against the run before anything is staged; fill defaults
    (``s = min(2k, D)`` for the inner modes, the seed's choice)."""
    n_params = run.n_params
    if s is None and recovery in _INNER_MODES:
        s = min(2 * int(k), n_params) if isinstance(k, int) else s
    check_sketch_config(recovery, k, s, power_iters or 0, dim=n_params)
    block = resolve_block_size(block_size, n_params, dtype, chunk_bytes)
    basis_width = int(k)
    if recovery == "krylov":
        basis_width = (int(power_iters or 0) + 1) * int(k)
        if block_size is None:
            block = max(d for d in range(1, min(block, int(k)) + 1) if int(k) % d == 0)
        elif int(k) % block:
            raise UserInputError(
                f"--recovery krylov stores its Krylov blocks of k={k} columns side by side, "
                f"so --block-size must divide k; got {block_size}"
            )
    return SketchOptions(
        recovery=recovery,
        noise=noise,
        k=int(k),
        s=None if s is None else int(s),
        power_iters=int(power_iters or 0),
        n_probes=DEFAULT_PROBES if probes is None else int(probes),
        seed=int(seed),
        block_size=block,
        param_block_size=int(
            param_block_size or param_block_rows(n_params, basis_width, chunk_bytes)
        ),
        dtype=dtype,
        batch_size=batch_size,
    )


@validate_params(
    {
        "split": SPLIT,
        "n_examples": [None, *POSITIVE_INT],
        "recovery": [Options(*HESSIAN_RECOVERIES)],
        "noise": [Options(*HESSIAN_NOISES)],
        "k": POSITIVE_INT,
        "s": [None, *POSITIVE_INT],
        "power_iters": [None, Interval(int, 0, None)],
        "probes": [None, Interval(int, 0, None)],
        "seed": SEED,
        "block_size": [None, *POSITIVE_INT],
        "param_block_size": [None, *POSITIVE_INT],
        "batch_size": [None, *POSITIVE_INT],
        "dtype": DTYPE,
    }
)
def run_hessian_sketch(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    split: str = "train",
    n_examples: int | None = None,
    balanced: bool = False,
    k: int = 20,
    s: int | None = None,
    recovery: str = "recycled",
    noise: str = "ssrft",
    power_iters: int | None = None,
    probes: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    param_block_size: int | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Random measurements of the Hessian of a checkpoint's mean loss (a ``hessian_sketch``).

    Args:
        lake: the lake (or its URL).
        run_id: a run with its dataset.
        checkpoint: checkpoint index (negative from the end).
        split: the split the subset is drawn from (train labels as trained).
        n_examples: the first ``n`` examples (default all), or with ``balanced`` the size of
            the class-balanced subset.
        balanced: draw a class-balanced subset with ``seed`` instead of the first ``n``.
        k: outer sketch size, the number of eigenpairs recovered.
        s: inner sketch size (``recycled``, ``oversampled``; default ``min(2k, D)``); refused
            by the other modes.
        recovery: ``recycled`` (the seed's SkEIGH, ``s`` HVPs), ``oversampled`` (``k + s``),
            ``hmt`` (``(2 + 2q) k``), ``krylov`` (``(2 + q) k``), ``nystrom`` or
            ``singlepass`` (``k``).
        noise: test matrices: ``ssrft``, ``gaussian`` or ``rademacher``.
        power_iters: ``hmt``: subspace iterations ``q`` (two rounds each); ``krylov``: the
            Krylov depth ``q`` (a basis of ``q + 1`` blocks of ``k`` columns, one round each).
        probes: Gaussian probes for the a-posteriori error (default :data:`DEFAULT_PROBES`).
        seed: seed of the test matrices (and of the balanced draw).
        block_size: columns per task and per stored chunk (default: by the chunk budget).
        param_block_size: rows of θ per chunk (default: by the chunk budget, at least 2k).
        batch_size: examples per HVP batch (default: that of the curvature operator).
        dtype: ``float32`` or ``float64`` HVPs and sketches.

    Returns:
        The ``hessian_sketch`` artifact id (the same inputs return the same artifact; a killed
        run, rerun, computes only the missing columns).
    """
    lake = as_lake(lake)
    run = resolve_run(lake, run_id)
    checkpoint = run.checkpoint_index(checkpoint)
    options = _sketch_options(
        run,
        lake.chunk_bytes,
        recovery=recovery,
        noise=noise,
        k=k,
        s=s,
        power_iters=power_iters,
        probes=probes,
        seed=seed,
        block_size=block_size,
        param_block_size=param_block_size,
        dtype=dtype,
        batch_size=batch_size,
    )
    subset = hessian_subset(run, split, n_examples, balanced, seed)
    config = {
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": subset.n,
        "balanced": bool(balanced),
        "recovery": options.recovery,
        "noise": options.noise,
        "k": options.k,
        "s": options.s,
        "power_iters": options.power_iters,
        "probes": options.n_probes,
        "seed": options.seed,
        "block_size": options.block_size,
        "param_block_size": options.param_block_size,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    writer = lake.begin("hessian_sketch", config, [run_id])
    if writer.complete:
        return writer.id
    context = HvpContext(
        lake.url, run_id, checkpoint, split, subset.rows, dtype, options.batch_size
    )
    with writer:
        totals = _measure_sketch(writer, run, context, options, progress)
        table = run.layer_table()
        writer.write_many({"sample_id": subset.sample_id, **table_arrays(table)})
        writer.set_attrs(
            recovery=options.recovery,
            noise=options.noise,
            seed=options.seed,
            k=options.k,
            s=options.s,
            power_iters=options.power_iters,
            n_probes=options.n_probes,
            n_params=run.n_params,
            n_hvps=totals["hvps"],
            n_passes=totals["rounds"],
            n_data_passes=totals["passes"],
            run=run_id,
            checkpoint=checkpoint,
            epoch=run.checkpoint_epochs[checkpoint],
            split=split,
            n_examples=subset.n,
            balanced=bool(balanced),
            param_block_size=options.param_block_size,
            dtype=dtype,
            parameter_fingerprint=table.fingerprint,
        )
    return writer.commit()


def _measure_sketch(
    writer: ArtifactWriter,
    run: RunInput,
    context: HvpContext,
    options: SketchOptions,
    progress: bool,
) -> dict[str, int]:
    """Create the arrays, run every round, check the HVP accounting; return the totals."""
    dim, k, s, q = run.n_params, options.k, options.s, options.n_probes
    b, rows, dtype = options.block_size, options.param_block_size, options.dtype
    mode, iters = options.recovery, options.power_iters

    def matrix(operator: str, n_columns: int, kind: str | None = None) -> RandomTestMatrix:
        return RandomTestMatrix(kind or options.noise, options.seed, operator, (dim, n_columns))

    def param_array(name: str, n_columns: int) -> Any:
        return writer.create_array(name, (dim, n_columns), dtype, chunks=(rows, b))

    work = writer.work_group("sketch")
    first_segments = {"recycled": [s], "oversampled": [k, s]}.get(mode, [k]) + ([q] if q else [])
    n_rounds = {"hmt": 2 + 2 * iters, "krylov": 2 + iters}.get(mode, 1)
    n_tasks = tasks_per_round(first_segments, b) + (n_rounds - 1) * tasks_per_round([k], b)
    counters = _work_array(work, "counters", (n_tasks, 2), "int64", (1, 2))
    planner = _Planner(writer, b, counters)

    outer = param_array("outer", k)
    y0 = (
        outer
        if mode != "hmt" or iters == 0
        else _work_array(work, "y_0", (dim, k), dtype, (rows, b))
    )
    segments: list[tuple] = []
    if mode in _INNER_MODES:
        inner = writer.create_array("inner", (s, s), "float64", chunks=(s, b))
        phi = matrix("inner_left", s)
        if mode == "oversampled":
            segments.append((matrix("outer", k), k, _columns_into(outer), None))
            segments.append((matrix("inner_right", s), s, _nowhere, (phi, inner)))
        else:
            segments.append(
                (matrix("inner_right", s), s, _columns_into(outer, limit=k), (phi, inner))
            )
    else:
        segments.append((matrix("outer", k), k, _columns_into(y0), None))
    if q:
        probe_image = param_array("probe_image", q)
        segments.append((matrix("probe", q, "gaussian"), q, _columns_into(probe_image), None))
    run_round(planner.round("round_0", segments), context, progress)

    if mode == "hmt":
        y = y0
        for i in range(2 * iters):
            basis = _work_array(work, f"q_{i}", (dim, k), dtype, (rows, b))
            _orthonormalize_stage(writer, f"qr_{i}", y, basis, rows)
            y = (
                outer
                if i == 2 * iters - 1
                else _work_array(work, f"y_{i + 1}", (dim, k), dtype, (rows, b))
            )
            step = planner.round(
                f"round_{i + 1}", [(StoredColumns(basis), k, _columns_into(y), None)]
            )
            run_round(step, context, progress)
        basis = param_array("basis", k)
        _orthonormalize_stage(writer, "qr_final", y, basis, rows)
        image = param_array("basis_image", k)
        last = planner.round(
            f"round_{n_rounds - 1}", [(StoredColumns(basis), k, _columns_into(image), None)]
        )
        run_round(last, context, progress)
    elif mode == "krylov":
        _measure_krylov(writer, planner, context, outer, param_array, k, iters, rows, progress)

    spent = np.asarray(counters[:], dtype=np.int64)
    expected = budget(mode, k, s, iters, q)
    if int(spent[:, 0].sum()) != expected.hvps or int(spent[:, 1].max(initial=0)) != 1:
        raise LakeError(
            f"HVP accounting does not match the budget of {mode}: the tasks made "
            f"{int(spent[:, 0].sum())} HVPs in {int(spent[:, 1].sum())} passes, the budget is "
            f"{expected.hvps} HVPs (remove the staging with `curvlake lake gc` and rerun)"
        )
    return {
        "hvps": expected.hvps,
        "rounds": expected.data_passes,
        "passes": int(spent[:, 1].sum()),
    }
