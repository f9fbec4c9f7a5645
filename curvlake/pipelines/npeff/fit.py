"""NPEFF factorizations into the lake: ``run_npeff_fit``, ``run_npeff_sparsify``,
``run_npeff_coeffs``.

D-NPEFF out of core (``run_npeff_fit``, ``kind="diag"``):

1. the PEF artifact (example-major top-k rows) is re-laid out once into normalized, pruned CSR
   *column blocks* stored in the artifact's staging area (``_work/A/b<block>``), one task per
   block;
2. every iteration is one pass of Dask tasks over those blocks (``A Hᵀ`` and ``H Hᵀ`` are
   reductions, each H block is updated where it lives, see :mod:`.nmf`); H is written into one
   of two Zarr buffers every iteration and the small state (W, AHᵀ, HHᵀ, losses) into the
   matching buffer, the iteration number last — so a killed fit, rerun, resumes from the last
   finished iteration with the same iterates as an uninterrupted fit;
3. on convergence (or ``max_iter``) W, H, the column map and the loss history become the
   ``npeff`` artifact and the work area is removed.

Only blocks of A (and of H) are ever in a worker's memory; W (n × r) lives on the client. When
A's blocks take at most ``PERSIST_SHARE`` of the workers' total memory they are read once and
kept in the workers' memory (``persist``) for all iterations; otherwise every pass reads them from
the staging area again (out of core).
LRM-NPEFF (``kind="lowrank"``) reads the low-rank PEFs into memory for preprocessing (n·k values),
then runs the same kind of resumable Dask iteration over column blocks of X.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import zarr

from curvlake.constants import COEFF_METHODS, NMF_SOLVERS, NPEFF_KINDS
from curvlake.engine import current_client, memory_budget, run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import ArtifactWriter, Lake, create_work_array, open_lake
from curvlake.lake._artifact import WORK_GROUP
from curvlake.pipelines.npeff import lrm as lrm_solver
from curvlake.pipelines.npeff import nmf as nmf_solver
from curvlake.pipelines.npeff.coeffs import gram, nnls_gram, sparsify
from curvlake.pipelines.skeleton import POSITIVE_INT, SEED, as_lake, require_artifact
from curvlake.progress import progress_bar
from curvlake.validation import Interval, Options, check, refuse_unused, validate_params

# -- inputs --------------------------------------------------------------------------------------


def _pefs(lake: Lake, pefs_id: str):
    require_artifact(lake, pefs_id, "pefs", role="PEF artifact (--pefs)")
    return lake.open(pefs_id)


def _store_block(block: Any, group: zarr.Group, b: int, done: zarr.Array) -> int:
    """Write one CSR column block of A into ``group/b<b>`` (its own arrays: owned chunks)."""
    csr = sp.csr_matrix(block)
    sub = group.require_group(f"b{b}")
    for name, values in (
        ("data", csr.data),
        ("indices", csr.indices.astype(np.int32)),
        ("indptr", csr.indptr.astype(np.int64)),
    ):
        create_work_array(sub, name, values.shape, values.dtype, overwrite=True)[...] = values
    done[b] = 1
    return b


def _load_block(url: str, widths: list[int], b: int) -> sp.csr_matrix:
    """Read CSR block ``b`` (arrays opened by path: no group listing)."""
    data, indices, indptr = (
        zarr.open_array(f"{url}/b{b}/{name}", mode="r")[:] for name in ("data", "indices", "indptr")
    )
    return sp.csr_matrix((data, indices, indptr), shape=(indptr.size - 1, widths[b]))


def _block_nbytes(url: str, n_blocks: int) -> int:
    """Bytes of the stored CSR blocks once in memory (from the arrays' metadata)."""
    return sum(
        zarr.open_array(f"{url}/b{b}/{name}", mode="r").nbytes
        for b in range(n_blocks)
        for name in ("data", "indices", "indptr")
    )


# A fits "in memory" when its blocks take at most this share of the workers' memory; it is then
# read once and kept there (persisted) instead of being read from the staging area every pass.
PERSIST_SHARE = 0.25


def _column_blocks(writer: ArtifactWriter, pefs, block_size: int, progress: bool):
    """The normalized, pruned PEF matrix as a lazy Dask array of stored CSR column blocks."""
    a_group = writer.work_group("A")
    if "kept_columns" not in a_group.array_keys():
        n_params = int(pefs.attrs["n_parameters"])
        if pefs.attrs["storage"] == "topk":
            A, kept = nmf_solver.topk_to_dask_column_blocks(
                pefs["values"].data,
                pefs["indices"].data,
                pefs["dense_norm"].data,
                n_params=n_params,
                block_size=block_size,
            )
        else:
            matrix = nmf_solver.preprocess_pefs(
                pefs["dense"].values, dense_norm=pefs["dense_norm"].values, block_size=block_size
            )
            A, kept = matrix.to_dask(), matrix.kept_columns
        widths = [int(w) for w in A.chunks[1]]
        done = writer.progress("A_blocks", len(widths))
        blocks = A.to_delayed().ravel()
        stores = [
            dask.delayed(_store_block)(blocks[b], a_group, b, done.array) for b in done.pending()
        ]
        with progress_bar(total=1, desc="lay out PEF column blocks", disable=not progress) as bar:
            dask.compute(*stores)
            bar.update()
        a_group.attrs["widths"] = widths
        create_work_array(a_group, "kept_columns", kept.shape, "int64")[...] = kept
    widths = [int(w) for w in a_group.attrs["widths"]]
    kept = np.asarray(a_group["kept_columns"][:])
    n = pefs.sizes["example"]
    url = f"{writer.url}/{WORK_GROUP}/A"
    A = nmf_solver.dask_from_block_loader(
        functools.partial(_load_block, url, widths), n, widths, np.float32, name=f"A-{writer.id}"
    )
    if _block_nbytes(url, len(widths)) <= PERSIST_SHARE * memory_budget():
        A = A.persist()
    return A, kept


# -- D-NPEFF ---------------------------------------------------------------------------------


STATE_ARRAYS = ("W", "AHt", "HHt")


def _state_buffers(state_group: zarr.Group, n: int, r: int) -> dict[str, zarr.Array]:
    """The two buffers of each small state array, created once (handles reused every save)."""
    shapes = {"W": (n, r), "AHt": (n, r), "HHt": (r, r)}
    existing = set(state_group.array_keys())
    buffers = {}
    for name in STATE_ARRAYS:
        for b in range(2):
            key = f"{name}{b}"
            if key not in existing:
                create_work_array(state_group, key, shapes[name], "float64")
            buffers[key] = state_group[key]
    return buffers


def _save_state(state_group: zarr.Group, buffers: dict[str, zarr.Array], state) -> None:
    """Double-buffered small state; ``meta`` (the iteration) is written last."""
    t = state.iteration
    arrays, meta = state.checkpoint()
    for name in STATE_ARRAYS:
        buffers[f"{name}{t % 2}"][...] = np.asarray(arrays[name], dtype=np.float64)
    state_group.attrs["meta"] = {**meta, "buffer": t % 2}


def _load_state(A, state_group: zarr.Group, buffers, H_buffers):
    meta = state_group.attrs.get("meta")
    if meta is None:
        return None
    b = meta["buffer"]
    arrays = {name: buffers[f"{name}{b}"][:] for name in STATE_ARRAYS}
    arrays["H"] = da.from_zarr(H_buffers[b])
    return nmf_solver.nmf_state_from_checkpoint(A, arrays, meta)


def _fit_diag(writer, pefs, config: nmf_solver.NmfConfig, block_size: int, progress: bool):
    A, kept = _column_blocks(writer, pefs, block_size, progress)
    state_group = writer.work_group("state")
    r = config.n_components
    H_buffers = []
    for i in range(2):
        key = f"H{i}"
        if key not in state_group.array_keys():
            create_work_array(
                state_group, key, (r, A.shape[1]), "float32", chunks=(r, max(A.chunks[1]))
            )
        H_buffers.append(state_group[key])
    buffers = _state_buffers(state_group, A.shape[0], r)
    state = _load_state(A, state_group, buffers, H_buffers)
    if state is None:
        state = nmf_solver.nmf_init_dask(A, config)
        _save_state_with_h(state_group, buffers, state, H_buffers)
    bar = progress_bar(
        total=config.max_iter,
        initial=state.iteration,
        desc="D-NPEFF",
        unit="it",
        disable=not progress,
    )
    steps = nmf_solver.iter_nmf_dask(A, config, state=state, h_target=lambda t: H_buffers[t % 2])
    for step in steps:
        state = step
        _save_state(state_group, buffers, state)
        bar.update()
        bar.set_postfix(loss=f"{state.losses[-1]:.5f}", refresh=False)
    bar.close()
    return state, kept


def _save_state_with_h(state_group, buffers, state, H_buffers) -> None:
    """The initial state: its H (lazy random init) is stored in buffer 0 first."""
    da.store(state.H.astype(np.float32), H_buffers[0], lock=False)
    state.H = da.from_zarr(H_buffers[0])
    _save_state(state_group, buffers, state)


# -- LRM-NPEFF -------------------------------------------------------------------------------


def _lrm_matrix(pefs, block_size: int) -> lrm_solver.LrmPefMatrix:
    if pefs.attrs["pef_kind"] == "diag":
        raise UserInputError("LRM-NPEFF needs lowrank or lvrm PEFs (pefs compute --kind lowrank)")
    if pefs.attrs["storage"] == "topk":
        return lrm_solver.preprocess_lrm_pefs(
            pefs["values"].values,
            pefs["class_index"].values,
            pefs["indices"].values,
            pefs["dense_norm"].values,
            n_params=int(pefs.attrs["n_parameters"]),
            n_classes=int(pefs.sizes.get("class", pefs.attrs["num_classes"])),
            block_size=block_size,
        )
    return lrm_solver.preprocess_lrm_pefs(
        pefs["factors"].values, frobenius_norm=pefs["dense_norm"].values, block_size=block_size
    )


def _fit_lowrank(writer, pefs, config: lrm_solver.LrmConfig, block_size: int, progress: bool):
    matrix = _lrm_matrix(pefs, block_size)
    with warnings.catch_warnings():  # X is in memory here: sent to the workers once, not per pass
        warnings.filterwarnings("ignore", message="Sending large graph")
        X = matrix.to_dask().persist()
    C = matrix.n_classes
    state_group = writer.work_group("lrm_state")
    state = None
    meta = state_group.attrs.get("meta")
    if meta is not None:
        b = meta["buffer"]
        arrays = {
            name: state_group[f"{name}{b}"][:]
            for name in ("W", "G", "AG", "S", "adam_m", "adam_v")
            if f"{name}{b}" in state_group
        }
        state = lrm_solver.lrm_state_from_checkpoint(X, arrays, meta)
    total = config.n_iters_g_only + config.n_iters_joint
    bar = progress_bar(
        total=total,
        initial=0 if state is None else state.iteration,
        desc="LRM-NPEFF",
        unit="it",
        disable=not progress,
    )
    final = state
    buffers = {key: state_group[key] for key in state_group.array_keys()}  # opened once
    for final in lrm_solver.iter_lrm_dask(
        X, config, n_classes=C, state=state, tr_const=matrix.tr_const
    ):
        if not math.isfinite(final.losses[-1]):
            raise UserInputError(
                f"LRM-NPEFF diverged at iteration {final.iteration} (the loss is not finite): "
                f"lower the learning rate (--lrm learning_rate=..., now {config.learning_rate:g})"
            )
        arrays, meta = final.checkpoint()
        b = final.iteration % 2
        for name, value in arrays.items():
            if value is None:
                continue
            value = np.asarray(value.compute() if isinstance(value, da.Array) else value)
            key = f"{name}{b}"
            if key not in buffers:
                buffers[key] = create_work_array(state_group, key, value.shape, value.dtype)
            buffers[key][...] = value
        state_group.attrs["meta"] = {**meta, "buffer": b}
        bar.update()
        bar.set_postfix(loss=f"{final.rel_losses[-1]:.5f}", refresh=False)
    bar.close()
    if final is None:  # zero iterations asked for
        final = lrm_solver.lrm_init_dask(X, config, n_classes=C, tr_const=matrix.tr_const)
    return final, matrix.kept_columns


# -- entry points ----------------------------------------------------------------------------

#: LrmConfig fields set by their own options of ``npeff fit``, not by ``--lrm``.
_LRM_OWN_OPTIONS = {
    "n_components": "--components",
    "n_iters_joint": "--max-iter",
    "tol": "--tol",
    "seed": "--seed",
}


def _check_lrm_options(lrm_options: dict[str, Any]) -> None:
    """Every ``--lrm`` key must be an LrmConfig field without an option of its own."""
    fields = [f.name for f in dataclasses.fields(lrm_solver.LrmConfig)]
    for key in lrm_options:
        if key in _LRM_OWN_OPTIONS:
            raise UserInputError(
                f"bad LRM option --lrm {key}: give it as {_LRM_OWN_OPTIONS[key]} instead"
            )
        if key not in fields:
            valid = ", ".join(f for f in fields if f not in _LRM_OWN_OPTIONS)
            raise UserInputError(f"bad LRM option --lrm {key}: valid options are {valid}")


@validate_params(
    {
        "kind": [Options(*NPEFF_KINDS)],
        "solver": [Options(*NMF_SOLVERS)],
        "max_iter": [Interval(int, 0, None)],
        "tol": [Interval(float, 0, None)],
        "seed": SEED,
        "block_size": POSITIVE_INT,
    }
)
def run_npeff_fit(
    lake: Lake | str,
    pefs_id: str,
    *,
    n_components: int,
    kind: str = "diag",
    solver: str = "hals",
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    block_size: int = 4096,
    lrm_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> str:
    """Factorize a PEF artifact into ``n_components`` NPEFF components; return the npeff id.

    Args:
        lake: the lake (or its URL).
        pefs_id: a ``pefs`` artifact (diag for D-NPEFF; lowrank/lvrm for LRM-NPEFF).
        n_components: r.
        kind: ``diag`` (D-NPEFF) or ``lowrank`` (LRM-NPEFF).
        solver: D-NPEFF solver, ``hals`` (default; lower loss in less time, see
            benchmarks/RESULTS.md) or ``mu`` (the seed's multiplicative updates).
        max_iter, tol, seed: iterations, relative-loss tolerance, init seed.
        block_size: columns per block of the PEF matrix (the unit of work and of storage).
        lrm_options: LRM-NPEFF settings (``n_iters_g_only``, ``learning_rate``, ``optimizer``,
            ``ortho_strength`` ...; see ``LrmConfig``); ``max_iter`` is its joint iterations.
    """
    lake = as_lake(lake)
    pefs = _pefs(lake, pefs_id)
    n = pefs.sizes["example"]
    check("n_components", n_components, Interval(int, 1, n), context=f"{pefs_id} has {n} examples")
    if kind == "diag":
        refuse_unused(
            "to --kind diag (D-NPEFF); LRM-NPEFF options need --kind lowrank",
            lrm_options=lrm_options or None,
        )
        if pefs.attrs["pef_kind"] != "diag":
            raise UserInputError(
                f"{pefs_id} holds {pefs.attrs['pef_kind']} PEFs; D-NPEFF needs "
                "diag PEFs (or use --kind lowrank)"
            )
        fit_config: Any = nmf_solver.NmfConfig(
            n_components=n_components, solver=solver, max_iter=max_iter, tol=tol, seed=seed
        )
    else:
        if pefs.attrs["pef_kind"] == "diag":
            raise UserInputError(
                "LRM-NPEFF needs lowrank or lvrm PEFs (pefs compute --kind lowrank); "
                f"{pefs_id} holds diag PEFs (fit them with --kind diag)"
            )
        _check_lrm_options(lrm_options or {})
        options = {"n_iters_joint": max_iter, "tol": tol, "seed": seed, **(lrm_options or {})}
        fit_config = lrm_solver.LrmConfig(n_components=n_components, **options)
    config = {
        "kind": kind,
        "n_components": n_components,
        "block_size": block_size,
        "solver": solver if kind == "diag" else fit_config.optimizer,
        "max_iter": max_iter,
        "tol": tol,
        "seed": seed,
        "lrm_options": dict(lrm_options or {}) if kind == "lowrank" else None,
    }
    writer = lake.begin("npeff", config, [pefs_id])
    if writer.complete:
        return writer.id
    current_client()  # inputs are checked: start the cluster of a lazy session now
    with writer:
        if kind == "diag":
            state, kept = _fit_diag(writer, pefs, fit_config, block_size, progress)
            factor_name, factor = "H", state.H
        else:
            state, kept = _fit_lowrank(writer, pefs, fit_config, block_size, progress)
            factor_name, factor = "G", state.G
        writer.write("W", np.asarray(state.W, dtype=np.float64))
        target = writer.create_array(
            factor_name,
            factor.shape,
            "float32",
            chunks=(factor.shape[0], min(block_size, factor.shape[1])),
        )
        da.store(da.asarray(factor).astype(np.float32).rechunk(target.chunks), target, lock=False)
        writer.write("kept_columns", np.asarray(kept, dtype=np.int64))
        # Both kinds: the relative data loss (LRM: √(Σ‖F_i − Σ_j W_ij g_j g_jᵀ‖² / Σ‖F_i‖²));
        # the LRM objective (with the orthogonality penalty) is kept beside it.
        writer.write(
            "loss", np.asarray(state.losses if kind == "diag" else state.rel_losses, np.float64)
        )
        if kind == "lowrank":
            writer.write("objective", np.asarray(state.losses, dtype=np.float64))
        writer.write(
            "seconds", np.asarray([0.0, *state.seconds], dtype=np.float64)[: len(state.losses)]
        )
        writer.write("label", pefs["label"].values)
        writer.write("sample_id", pefs["sample_id"].values)
        writer.set_attrs(
            format="dense" if kind == "diag" else "lowrank",
            n_components=n_components,
            n_parameters=int(pefs.attrs["n_parameters"]),
            solver=config["solver"],
            converged=bool(state.converged),
            pefs=pefs_id,
            iterations=int(state.iteration),
        )
    return writer.commit()


def run_npeff_sparsify(lake: Lake | str, npeff_id: str, *, threshold: float) -> str:
    """Row-normalize H, move the scale into W, drop entries below ``threshold`` (CSR H)."""
    lake = as_lake(lake)
    require_artifact(lake, npeff_id, "npeff", role="NPEFF artifact")
    source = lake.open(npeff_id)
    if source.attrs.get("format") != "dense":
        raise UserInputError(
            f"{npeff_id} is a {source.attrs.get('format')} NPEFF artifact; sparsify takes a "
            "dense D-NPEFF fit"
        )
    # Rows of H are normalized to unit L2 norm first, so entries lie in [0, 1].
    check("threshold", threshold, Interval(float, 0, 1, closed="left"))
    W, H = sparsify(source["W"].values, source["H"].data, threshold)
    empty = np.flatnonzero(np.diff(H.indptr) == 0)
    if empty.size:
        raise UserInputError(
            f"threshold={threshold} leaves component(s) {empty.tolist()[:10]} without any "
            "entry; choose a smaller threshold (nothing was stored)"
        )
    writer = lake.begin("npeff", {"sparsify_threshold": float(threshold)}, [npeff_id])
    if writer.complete:
        return writer.id
    writer.write("W", W)
    writer.write("H_data", np.asarray(H.values, dtype=np.float32))
    writer.write("H_indices", np.asarray(H.indices, dtype=np.int64))
    writer.write("H_indptr", H.indptr)
    for name in ("kept_columns", "loss", "seconds", "label", "sample_id"):
        writer.write(name, source[name].values)
    attrs = {
        k: v
        for k, v in source.attrs.items()
        if not k.startswith("curvlake:") and k != "coordinates"
    }
    attrs.update(format="csr", threshold=float(threshold), sparsified_from=npeff_id)
    writer.set_attrs(**attrs)
    return writer.commit()


def components_matrix(lake: Lake, npeff_id: str) -> da.Array | sp.csr_matrix:
    """H (r × kept columns) of an npeff artifact: lazy Dask (dense, lowrank) or in-memory CSR."""
    ds = lake.open(npeff_id)
    if ds.attrs["format"] == "dense":
        return ds["H"].data
    if ds.attrs["format"] == "lowrank":
        return ds["G"].data
    shape = (ds.sizes["component_ptr"] - 1, ds.sizes["column"])
    return sp.csr_matrix(
        (ds["H_data"].values, ds["H_indices"].values, ds["H_indptr"].values), shape=shape
    )


def dense_components(lake: Lake, npeff_id: str) -> np.ndarray:
    """H (r × kept columns) of an npeff artifact as a dense array (dense or CSR format)."""
    H = components_matrix(lake, npeff_id)
    return H.toarray() if sp.issparse(H) else np.asarray(H)


@functools.lru_cache(maxsize=2)
def _components_and_gram(lake_url: str, npeff_id: str):
    # A sparsified H stays CSR: the coefficient tasks never hold a dense r × P' copy of it.
    H = components_matrix(open_lake(lake_url), npeff_id)
    G = gram(H)
    return (H.astype(np.float64) if sp.issparse(H) else np.asarray(H, dtype=np.float64)), G


def _coeff_block(lake_url, npeff_id, pefs_id, rows: slice, out, done, block, options) -> int:
    lake = open_lake(lake_url)
    H, G = _components_and_gram(lake_url, npeff_id)
    kept = np.asarray(lake.group(npeff_id)["kept_columns"][:])
    group = lake.group(pefs_id)
    n_params = int(group.attrs["n_parameters"])
    norm = np.asarray(group["dense_norm"][rows], dtype=np.float64)
    if group.attrs["storage"] == "topk":
        values = np.asarray(group["values"][rows], dtype=np.float64)
        indices = np.asarray(group["indices"][rows], dtype=np.int64)
        m, k = values.shape
        A = sp.csr_matrix(
            (values.ravel(), (np.repeat(np.arange(m), k), indices.ravel())), shape=(m, n_params)
        )
    else:
        A = sp.csr_matrix(np.asarray(group["dense"][rows], dtype=np.float64))
    A = sp.diags(1 / (norm + nmf_solver.NORM_EPS)) @ A[:, kept]
    B = A @ H.T
    B = B.toarray() if sp.issparse(B) else np.asarray(B)
    out[rows] = nnls_gram(G, B, method=options["method"], max_iter=options["max_iter"])
    done[block] = 1
    return block


def _check_same_model(lake: Lake, fitted_pefs: str | None, new_pefs: str) -> None:
    """The new PEFs must come from the run and checkpoint the components were fitted at."""
    if not fitted_pefs:
        return  # components imported without their PEFs: only the parameter count is known
    fitted = lake.group(fitted_pefs).attrs
    new = lake.group(new_pefs).attrs
    for key in ("run", "checkpoint"):
        if fitted.get(key) != new.get(key):
            raise UserInputError(
                f"{new_pefs} has {key} {new.get(key)!r} but the components were fitted on PEFs "
                f"of {key} {fitted.get(key)!r} ({fitted_pefs}): coefficients need the same model"
            )


def run_npeff_coeffs(
    lake: Lake | str,
    npeff_id: str,
    pefs_id: str,
    *,
    method: str = "hals",
    max_iter: int = 1000,
    block_size: int = 1024,
    progress: bool = True,
) -> str:
    """Coefficients of new D-PEFs on fixed components: per-example NNLS, streamed in blocks.

    ``w_i = argmin_{w >= 0} ||a_i - w H||^2`` with ``a_i`` normalized and restricted to the
    components' kept columns, solved from ``H Hᵀ`` and ``a_i Hᵀ``. The result is an ``npeff``
    artifact with the same components and the new W.
    """
    lake = as_lake(lake)
    require_artifact(lake, npeff_id, "npeff", role="NPEFF artifact")
    components = lake.open(npeff_id)
    pefs = _pefs(lake, pefs_id)
    check("method", method, Options(*COEFF_METHODS))
    check("max_iter", max_iter, *POSITIVE_INT)
    check("block_size", block_size, *POSITIVE_INT)
    if components.attrs.get("format") not in ("dense", "csr"):
        raise UserInputError(f"{npeff_id} is not a D-NPEFF artifact")
    _check_same_model(lake, components.attrs.get("pefs"), pefs_id)
    if pefs.attrs["pef_kind"] != "diag":
        raise UserInputError(f"{pefs_id} holds {pefs.attrs['pef_kind']} PEFs, need diag")
    if int(pefs.attrs["n_parameters"]) != int(components.attrs["n_parameters"]):
        raise UserInputError(
            f"{pefs_id} has {pefs.attrs['n_parameters']} parameters, the "
            f"components {components.attrs['n_parameters']}: not the same model"
        )
    n, r = pefs.sizes["example"], components.attrs["n_components"]
    config = {
        "coefficients_of": pefs_id,
        "method": method,
        "max_iter": max_iter,
        "block_size": block_size,
    }
    writer = lake.begin("npeff", config, [npeff_id, pefs_id])
    if writer.complete:
        return writer.id
    with writer:
        out = writer.create_array("W", (n, r), "float64", chunks=(block_size, r))
        done = writer.progress("blocks", -(-n // block_size))
        options = {"method": method, "max_iter": max_iter}
        tasks = [
            (
                lake.url,
                npeff_id,
                pefs_id,
                slice(b * block_size, min(n, (b + 1) * block_size)),
                out,
                done.array,
                b,
                options,
            )
            for b in done.pending()
        ]
        run_tasks(_coeff_block, tasks, description="NNLS coefficients", progress=progress)
        fmt = components.attrs["format"]
        names = ["kept_columns"] + (
            ["H"] if fmt == "dense" else ["H_data", "H_indices", "H_indptr"]
        )
        for name in names:
            writer.write(name, components[name].values)
        writer.write("loss", np.zeros(0))
        writer.write("seconds", np.zeros(0))
        writer.write("label", pefs["label"].values)
        writer.write("sample_id", pefs["sample_id"].values)
        writer.set_attrs(
            format=fmt,
            n_components=r,
            n_parameters=int(pefs.attrs["n_parameters"]),
            solver=f"nnls-{method}",
            converged=True,
            pefs=pefs_id,
            components_from=npeff_id,
        )
    return writer.commit()
