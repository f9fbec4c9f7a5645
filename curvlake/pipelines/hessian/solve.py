"""Eigenpairs from a Hessian sketch (``run_hessian_solve``), sketch + solve in one call
(``run_hessian_eig``), and the exact method for small nets.

The solve is the tall part of :func:`~curvlake.pipelines.hessian.recovery.sketched_eigh` on
Dask, with the small part in memory:

1. ``Y = Q R``: Dask TSQR over the row blocks of the stored ``(param, k)`` outer sketch; ``Q``
   goes to the staging area row block by row block (HMT and Krylov stored their bases with the
   sketch).
2. The projections the mode needs, as row-block map-reduces (SSRFT: a transform per block of
   whole columns): ``Φᵀ Q`` and ``Ψᵀ Q`` (recycled, oversampled), ``Ωᵀ Q`` (singlepass),
   ``Ωᵀ Y`` (nystrom), ``Qᵀ (A Q)`` (hmt; krylov: ``Bᵀ (A B)`` of its whole stored basis,
   whose ``n_eigs`` Ritz pairs of largest ``|λ|`` are kept, ``k`` by default), and ``Qᵀ Ω_p``
   for the error probes.
3. The core in float64, symmetrized, diagonalized, ordered by ``|λ|``
   (:func:`~curvlake.pipelines.hessian.recovery.core_from_projections`).
4. ``U = Q W``, stored row block by row block, each eigenvector signed so that its entry of
   largest magnitude is positive; the a-posteriori error from the probes
   (:func:`~curvlake.pipelines.hessian.recovery.probe_residual_partials`, again per row block),
   its tail bounds and the scree bounds.

No step holds a ``(param, k)`` array in one worker: only row blocks, ``(D, b)`` column blocks
(SSRFT) and ``k × k`` / ``s × k`` matrices.

``method="exact"`` measures the dense Hessian column block by column block (the same tasks as
the sketch, with identity columns), diagonalizes it in float64 in memory and stores the top-k
eigenpairs in the same kind, with exact ``frob2``, ``err2`` and scree: sketched and exact
results compare array for array. It is refused above :data:`EXACT_MAX_PARAMS` parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import scipy.linalg

from curvlake.constants import HESSIAN_METHODS, HESSIAN_NOISES, HESSIAN_RECOVERIES
from curvlake.engine import current_client, run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import ArtifactWriter, Lake
from curvlake.nn.params import table_arrays
from curvlake.pipelines.hessian._tall import (
    orthonormalize_into,
    param_block_rows,
    row_block_reduce,
    sign_convention,
    signed_by_largest_entry,
    store_rotated,
    tall,
    transpose_project,
)
from curvlake.pipelines.hessian.recovery import (
    DEFAULT_RCOND,
    check_n_eigs,
    core_from_projections,
    error_tail_bounds,
    finalize_error_estimate,
    probe_residual_partials,
    project,
    scree_bounds,
)
from curvlake.pipelines.hessian.sketch import (
    HvpContext,
    IdentityColumns,
    Measurement,
    Piece,
    _work_array,
    hessian_subset,
    measure_block,
    resolve_block_size,
    run_hessian_sketch,
)
from curvlake.pipelines.hessian.test_matrices import RandomTestMatrix
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    SPLIT,
    as_lake,
    require_artifact,
    resolve_run,
)
from curvlake.validation import Interval, Options, check, refuse_unused, validate_params

#: Largest net the exact method accepts: the dense Hessian is ``D × D`` in one process.
EXACT_MAX_PARAMS = 8192
#: Relative errors ε at which the a-posteriori tail bounds are stored.
TAIL_EPSILONS = (0.25, 0.5, 1.0)
_RCOND = [Interval(float, 0, 1, closed="left")]
_LAYER_ARRAYS = ("layer", "layer_offset", "layer_size", "layer_shape")


# -- row-block partials ------------------------------------------------------------------------


def _cross_rows(row_start: int, left: Any, right: Any) -> Any:
    return project(left, right)


def _probe_rows(row_start: int, q_block: Any, probes: RandomTestMatrix) -> Any:
    from curvlake._array import get_namespace

    xp = get_namespace(q_block)
    n = q_block.shape[0]
    omega = probes.block((row_start, row_start + n), (0, probes.shape[1]), xp.float64, xp)
    return project(q_block, omega)


def _residual_rows(
    row_start: int, q_block: Any, image_block: Any, rotation: np.ndarray, lam, coef
) -> Any:
    from curvlake._array import get_namespace

    xp = get_namespace(q_block)
    u = xp.asarray(q_block, dtype=xp.float64) @ xp.asarray(rotation)
    return probe_residual_partials(u, lam, coef, image_block)


# -- the test matrices of a stored sketch ------------------------------------------------------


def sketch_test_matrices(attrs: dict) -> dict[str, Any]:
    """Ω, Ψ, Φ and the probes of a sketch, from its attributes (no data)."""
    dim, k, s, q = attrs["n_params"], attrs["k"], attrs.get("s"), attrs["n_probes"]
    noise, seed = attrs["noise"], attrs["seed"]
    mats: dict[str, Any] = {}
    if noise == "seed_ssrft":
        from curvlake.pipelines.hessian.hdf5_import import SeedSsrft

        mats["inner_right"] = SeedSsrft(attrs["seed_inner_right"], (dim, s))
        mats["inner_left"] = SeedSsrft(attrs["seed_inner_left"], (dim, s))
    else:
        mats["outer"] = RandomTestMatrix(noise, seed, "outer", (dim, k))
        if s:
            mats["inner_right"] = RandomTestMatrix(noise, seed, "inner_right", (dim, s))
            mats["inner_left"] = RandomTestMatrix(noise, seed, "inner_left", (dim, s))
    if q:
        mats["probe"] = RandomTestMatrix("gaussian", seed, "probe", (dim, q))
    return mats


# -- solving -----------------------------------------------------------------------------------


def _error_summary(eigenvalues: np.ndarray, partials: Any, n_probes: int) -> dict[str, Any]:
    estimate = finalize_error_estimate(partials)
    scree = scree_bounds(
        eigenvalues, math.sqrt(max(estimate.err2, 0.0)), norm_frob=math.sqrt(estimate.frob2)
    )
    return {
        "arrays": {
            "scree_lower": scree.lower,
            "scree_upper": scree.upper,
            "scree_lower_strict": scree.lower_strict,
            "probe_norms": estimate.per_probe,
        },
        "attrs": {
            "frob2": estimate.frob2,
            "frob2_approx": estimate.frob2_approx,
            "err2": estimate.err2,
            "rel_err": math.sqrt(max(estimate.err2, 0.0) / estimate.frob2)
            if estimate.frob2 > 0
            else None,
            "error_tail_bounds": {
                f"{eps:g}": list(error_tail_bounds(n_probes, eps)) for eps in TAIL_EPSILONS
            },
        },
    }


def _solve_into(
    writer: ArtifactWriter, lake: Lake, sketch_id: str, rcond: float, n_eigs: int
) -> dict:
    """The solve (module docstring, steps 1-4), keeping ``n_eigs`` eigenpairs; returns the
    error summary."""
    group = lake.group(sketch_id)
    attrs = dict(group.attrs)
    ds = lake.open(sketch_id)
    mode, dim, k, q = attrs["recovery"], attrs["n_params"], attrs["k"], attrs["n_probes"]
    rows = int(attrs["param_block_size"])
    outer = ds["outer"].data
    width, dtype = int(outer.chunks[1][0]), outer.dtype
    mats = sketch_test_matrices(attrs)
    current_client()  # a lazy session's cluster, so that the graphs below run on it

    tasks: dict[str, Any] = {}
    r = None
    if mode in ("hmt", "krylov"):
        names = ("basis", "basis_image") if mode == "hmt" else ("krylov_basis", "krylov_image")
        q_tall = tall(ds[names[0]].data, rows)
        tasks["qt_aq"] = row_block_reduce(_cross_rows, [q_tall, tall(ds[names[1]].data, rows)])
    else:
        work = writer.work_group("solve")
        basis = _work_array(work, "q", (dim, k), dtype, (rows, width))
        stage = writer.progress("qr", 1)
        if stage.pending():
            r_factor = _work_array(work, "r", (k, k), "float64", (k, k))
            r_factor[...] = orthonormalize_into(tall(outer, rows), basis)
            stage.mark_done(0)
        r = np.asarray(work["r"][...])
        q_tall = tall(basis, rows)
        if mode in ("recycled", "oversampled"):
            tasks["phi_t_q"] = transpose_project(mats["inner_left"], basis, rows, width)
            tasks["psi_t_q"] = transpose_project(mats["inner_right"], basis, rows, width)
        elif mode == "singlepass":
            tasks["omega_t_q"] = transpose_project(mats["outer"], basis, rows, width)
        else:
            tasks["omega_t_y"] = transpose_project(mats["outer"], outer, rows, width)
    if q:
        tasks["qt_probes"] = row_block_reduce(_probe_rows, [q_tall], mats["probe"])
    (small,) = dask.compute(tasks)
    inner = np.asarray(ds["inner"].values) if "inner" in ds else None
    solution = core_from_projections(
        mode,
        qt_aq=small.get("qt_aq"),
        inner=inner,
        phi_t_q=small.get("phi_t_q"),
        psi_t_q=small.get("psi_t_q"),
        r=r,
        omega_t_y=small.get("omega_t_y"),
        omega_t_q=small.get("omega_t_q"),
        rcond=rcond,
    )
    rotation, lam = solution.rotation[:, :n_eigs], solution.eigenvalues[:n_eigs]
    follow = {"signs": sign_convention(q_tall, rotation)}
    if q:
        coef = rotation.T @ small["qt_probes"]
        follow["partials"] = row_block_reduce(
            _residual_rows,
            [q_tall, tall(ds["probe_image"].data, rows)],
            rotation,
            lam,
            coef,
        )
    (done,) = dask.compute(follow)
    rotation = rotation * done["signs"]
    target = writer.create_array("eigenvectors", (dim, n_eigs), dtype, chunks=(rows, n_eigs))
    store_rotated(q_tall, rotation, target)
    summary = (
        _error_summary(lam, done["partials"], q)
        if q
        else {"arrays": {}, "attrs": {"frob2": None, "frob2_approx": None, "err2": None}}
    )
    writer.write_many(
        {
            "eigenvalues": lam,
            **summary["arrays"],
            **{name: group[name][:] for name in _LAYER_ARRAYS},
        }
    )
    writer.set_attrs(
        method="sketch",
        recovery=mode,
        noise=attrs["noise"],
        k=n_eigs,
        outer=k,
        s=attrs.get("s"),
        power_iters=attrs.get("power_iters", 0),
        n_probes=q,
        n_params=dim,
        n_hvps=attrs["n_hvps"],
        n_passes=attrs["n_passes"],
        n_data_passes=attrs.get("n_data_passes"),
        run=attrs["run"],
        checkpoint=attrs["checkpoint"],
        epoch=attrs.get("epoch"),
        split=attrs.get("split"),
        n_examples=attrs.get("n_examples"),
        sketch=sketch_id,
        rcond=rcond,
        param_block_size=rows,
        parameter_fingerprint=attrs["parameter_fingerprint"],
        **summary["attrs"],
    )
    return summary


@validate_params({"rcond": _RCOND, "n_eigs": [None, *POSITIVE_INT]})
def run_hessian_solve(
    lake: Lake | str,
    sketch_id: str,
    *,
    rcond: float = DEFAULT_RCOND,
    n_eigs: int | None = None,
) -> str:
    """Solve a ``hessian_sketch`` into a ``hessian_eigs`` artifact (module docstring).

    Args:
        lake: the lake (or its URL).
        sketch_id: a complete ``hessian_sketch``.
        rcond: relative singular-value cutoff of the core's least-squares solves.
        n_eigs: eigenpairs kept (default: the sketch's ``k``; ``krylov`` sketches keep up to
            ``(power_iters + 1) k`` Ritz pairs, the other modes at most ``k``).

    Returns:
        The ``hessian_eigs`` id (a function of the sketch, ``rcond`` and ``n_eigs``).
    """
    lake = as_lake(lake)
    require_artifact(lake, sketch_id, "hessian_sketch", role="sketch")
    attrs = lake.group(sketch_id).attrs
    k = int(attrs["k"])
    n_eigs = check_n_eigs(attrs["recovery"], k, int(attrs.get("power_iters") or 0), n_eigs)
    config: dict[str, Any] = {"method": "sketch", "rcond": float(rcond)}
    if n_eigs != k:  # the default keeps the ids of earlier solves
        config["n_eigs"] = n_eigs
    writer = lake.begin("hessian_eigs", config, [sketch_id])
    if writer.complete:
        return writer.id
    with writer:
        _solve_into(writer, lake, sketch_id, float(rcond), n_eigs)
    return writer.commit()


# -- the exact method --------------------------------------------------------------------------


def _exact_scree(lam_all: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """``τ²_{r+1}(A) / ‖A‖²_F`` for ``r = 0..k`` (exact: lower = upper)."""
    sq = np.sort(lam_all**2)[::-1]
    tail = np.cumsum(sq[::-1])[::-1]
    tail = np.append(tail, 0.0)[: k + 1]
    scree = tail / tail[0] if tail[0] > 0 else tail
    return {"scree_lower": scree, "scree_upper": scree.copy(), "scree_lower_strict": scree.copy()}


def _run_exact(
    lake: Lake,
    run_id: str,
    *,
    checkpoint: int,
    split: str,
    n_examples: int | None,
    balanced: bool,
    k: int,
    seed: int | None,
    block_size: int | None,
    param_block_size: int | None,
    batch_size: int | None,
    dtype: str,
    progress: bool,
) -> str:
    run = resolve_run(lake, run_id)
    checkpoint = run.checkpoint_index(checkpoint)
    dim = run.n_params
    if dim > EXACT_MAX_PARAMS:
        raise UserInputError(
            f"--method exact builds the dense {dim} x {dim} Hessian, so it is limited to nets "
            f"of at most {EXACT_MAX_PARAMS} parameters; use --method sketch"
        )
    check("k", k, Interval(int, 1, dim), context=f"the net has D={dim} parameters")
    if seed is not None and not balanced:
        refuse_unused("to --method exact without --balanced", seed=seed)
    subset = hessian_subset(run, split, n_examples, balanced, seed or 0)
    b = resolve_block_size(block_size, dim, dtype, lake.chunk_bytes)
    rows = int(param_block_size or param_block_rows(dim, k, lake.chunk_bytes))
    config = {
        "method": "exact",
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": subset.n,
        "balanced": bool(balanced),
        "seed": seed if balanced else None,
        "k": int(k),
        "block_size": b,
        "param_block_size": rows,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    writer = lake.begin("hessian_eigs", config, [run_id])
    if writer.complete:
        return writer.id
    context = HvpContext(lake.url, run_id, checkpoint, split, subset.rows, dtype, batch_size)
    with writer:
        work = writer.work_group("exact")
        n_blocks = -(-dim // b)
        dense = _work_array(work, "hessian", (dim, dim), dtype, (dim, b))
        counters = _work_array(work, "counters", (n_blocks, 2), "int64", (1, 2))
        status = writer.progress("blocks", n_blocks)
        identity = IdentityColumns(dim)
        tasks = []
        for block in status.pending():
            start, stop = block * b, min(dim, (block + 1) * b)
            piece = Piece(
                identity, start, stop, ((dense, start, 0, stop - start),), None, (block, block + 1)
            )
            tasks.append(Measurement((piece,), status.array, counters, block))
        run_tasks(
            measure_block,
            [(context, task) for task in tasks],
            description="dense Hessian",
            progress=progress,
        )
        hessian = np.asarray(dense[...], dtype=np.float64)
        lam_all, vectors = scipy.linalg.eigh(0.5 * (hessian + hessian.T))
        order = np.argsort(-np.abs(lam_all), kind="stable")
        top = order[:k]
        eigenvectors = signed_by_largest_entry(vectors[:, top])
        target = writer.create_array("eigenvectors", (dim, k), dtype, chunks=(rows, k))
        target[...] = eigenvectors.astype(dtype)
        table = run.layer_table()
        lam = lam_all[top]
        frob2 = float(np.sum(lam_all**2))
        writer.write_many({"eigenvalues": lam, **_exact_scree(lam_all, k), **table_arrays(table)})
        spent = np.asarray(counters[:])
        writer.set_attrs(
            method="exact",
            recovery=None,
            noise=None,
            k=int(k),
            s=None,
            power_iters=0,
            n_probes=0,
            n_params=dim,
            n_hvps=int(spent[:, 0].sum()),
            n_passes=1,
            n_data_passes=int(spent[:, 1].sum()),
            run=run_id,
            checkpoint=checkpoint,
            epoch=run.checkpoint_epochs[checkpoint],
            split=split,
            n_examples=subset.n,
            sketch=None,
            param_block_size=rows,
            frob2=frob2,
            frob2_approx=float(np.sum(lam**2)),
            err2=float(np.sum(lam_all[order[k:]] ** 2)),
            rel_err=math.sqrt(float(np.sum(lam_all[order[k:]] ** 2)) / frob2)
            if frob2 > 0
            else None,
            parameter_fingerprint=table.fingerprint,
        )
    return writer.commit()


# -- sketch + solve ----------------------------------------------------------------------------


@validate_params(
    {
        "method": [Options(*HESSIAN_METHODS)],
        "split": SPLIT,
        "n_examples": [None, *POSITIVE_INT],
        "recovery": [None, Options(*HESSIAN_RECOVERIES)],
        "noise": [None, Options(*HESSIAN_NOISES)],
        "k": POSITIVE_INT,
        "s": [None, *POSITIVE_INT],
        "power_iters": [None, Interval(int, 0, None)],
        "n_eigs": [None, *POSITIVE_INT],
        "probes": [None, Interval(int, 0, None)],
        "seed": [None, *SEED],
        "block_size": [None, *POSITIVE_INT],
        "param_block_size": [None, *POSITIVE_INT],
        "batch_size": [None, *POSITIVE_INT],
        "dtype": DTYPE,
        "rcond": [None, *_RCOND],
    }
)
def run_hessian_eig(
    lake: Lake | str,
    run_id: str,
    *,
    method: str = "sketch",
    checkpoint: int = -1,
    split: str = "train",
    n_examples: int | None = None,
    balanced: bool = False,
    k: int = 20,
    s: int | None = None,
    recovery: str | None = None,
    noise: str | None = None,
    power_iters: int | None = None,
    n_eigs: int | None = None,
    probes: int | None = None,
    seed: int | None = None,
    block_size: int | None = None,
    param_block_size: int | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    rcond: float | None = None,
    progress: bool = True,
) -> str:
    """The top-k eigenpairs of a checkpoint's Hessian as a ``hessian_eigs`` artifact.

    ``method="sketch"``: :func:`~curvlake.pipelines.hessian.sketch.run_hessian_sketch` (its
    options; ``recovery`` default ``recycled``, ``noise`` default ``ssrft``, ``seed``
    default 0) then :func:`run_hessian_solve`. ``method="exact"``: the dense Hessian
    (at most :data:`EXACT_MAX_PARAMS` parameters); the sketch options are refused, ``seed``
    only draws a ``balanced`` subset. ``n_eigs``: eigenpairs kept by the solve
    (:func:`run_hessian_solve`; checked before the sketch starts).

    Returns:
        The ``hessian_eigs`` id.
    """
    lake = as_lake(lake)
    if method == "exact":
        refuse_unused(
            "to --method exact (it diagonalizes the dense Hessian)",
            recovery=recovery,
            noise=noise,
            s=s,
            power_iters=power_iters,
            n_eigs=n_eigs,
            probes=probes,
            rcond=rcond,
        )
        return _run_exact(
            lake,
            run_id,
            checkpoint=checkpoint,
            split=split,
            n_examples=n_examples,
            balanced=balanced,
            k=k,
            seed=seed,
            block_size=block_size,
            param_block_size=param_block_size,
            batch_size=batch_size,
            dtype=dtype,
            progress=progress,
        )
    check_n_eigs(recovery or "recycled", k, power_iters or 0, n_eigs)
    sketch_id = run_hessian_sketch(
        lake,
        run_id,
        checkpoint=checkpoint,
        split=split,
        n_examples=n_examples,
        balanced=balanced,
        k=k,
        s=s,
        recovery=recovery or "recycled",
        noise=noise or "ssrft",
        power_iters=power_iters,
        probes=probes,
        seed=0 if seed is None else seed,
        block_size=block_size,
        param_block_size=param_block_size,
        batch_size=batch_size,
        dtype=dtype,
        progress=progress,
    )
    return run_hessian_solve(
        lake, sketch_id, rcond=DEFAULT_RCOND if rcond is None else rcond, n_eigs=n_eigs
    )


def run_hessian_eig_checkpoints(
    lake: Lake | str, run_id: str, checkpoints: str | Sequence[int] = "all", **options: Any
) -> list[str]:
    """:func:`run_hessian_eig` at several checkpoints (``"all"`` or indices): one artifact
    each, in checkpoint order. Bad options are refused by the first call, before anything is
    staged."""
    lake = as_lake(lake)
    chosen = resolve_run(lake, run_id).checkpoint_indices(checkpoints)
    return [run_hessian_eig(lake, run_id, checkpoint=c, **options) for c in chosen]
