"""Hessian measurements made with the seed (skerch 0.x HDF5 layouts) into a ``hessian_sketch``.

The seed (``10b``-``10d`` of "What Apples Tell About Oranges") measures a ``recycled`` SSRFT
sketch into a directory of HDF5 files, one per measurement:

================================ ===========================================================
``leftouter_<i>.h5``             ``data`` ``(D,)``: ``A ψ_i`` for ``i < k`` (the outer sketch);
                                 ``flags`` ``(1,)``: ``initialized``/``processing``/``measured``
``inner_<i>.h5``                 ``data`` ``(s,)``: ``Φ (A ψ_i)``, column ``i`` of the inner
                                 sketch; ``flags`` as above
``leftouter_ALL.h5``,            virtual views ``data`` ``(D, k)`` / ``(s, s)`` and ``flags``
``inner_ALL.h5``                 of the sub-files
``leftouter_MERGED.h5``,         the same as monolithic datasets (``python -m skerch
``inner_MERGED.h5``              merge_hdf5``; pre-allocated, then filled by ``10d``)
================================ ===========================================================

``ψ_i`` is row ``i`` of the seed's ``s × D`` SSRFT ``S_ri`` and ``Φ = S_li``, with seeds
``li = RANDOM_SEED + 1``, ``ri = RANDOM_SEED + 2`` in the seed's distributed scripts.
:class:`SeedSsrft` reproduces those operators (skerch 0.x's ``ssrft``, unchanged in skerch
1.x's ``SSRFT.ssrft``: torch CPU generators seeded ``seed + 0..4``, two signed permutations
and orthonormal DCT-IIs, then the first ``s`` entries of a permutation), so the imported sketch
solves here in the ``recycled`` mode with ``Ψ = S_riᵀ``, ``Φ = S_liᵀ``. Every measurement must
be flagged ``measured`` (a hard precondition, checked before anything is staged; the seed only
logged bad flags). The outer sketch is copied in column blocks under a progress record, so an
interrupted import resumes. h5py is optional (``pip install 'curvlake[hdf5]'``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curvlake._array import get_namespace
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.nn.params import table_arrays
from curvlake.pipelines.data import file_sha256
from curvlake.pipelines.hessian._tall import param_block_rows
from curvlake.pipelines.hessian.sketch import resolve_block_size
from curvlake.pipelines.skeleton import SEED, SPLIT, as_lake, resolve_run
from curvlake.validation import Interval, validate_params

#: The flag of a finished measurement in the seed's layouts.
MEASURED = "measured"
_SOURCES = ("auto", "merged", "subfiles")
_SUBFILE = re.compile(r"^(leftouter|inner)_(\d+)\.h5$")


# -- the seed's SSRFT --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _seed_plan(seed: int, dim: int) -> tuple[np.ndarray, ...]:
    """``(π₁, σ₁, π₂, σ₂, ρ)`` of skerch 0.x's SSRFT with ``seed`` (torch CPU generators)."""
    import torch

    def generator(offset: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(seed + offset)
        return g

    def permutation(offset: int) -> np.ndarray:
        return torch.randperm(dim, generator=generator(offset), device="cpu").numpy()

    def signs(offset: int) -> np.ndarray:
        noise = torch.rand(dim, generator=generator(offset), dtype=torch.float32, device="cpu")
        return np.where(noise.numpy() > 0.5, 1.0, -1.0)

    plan = (permutation(0), signs(1), permutation(2), signs(3), permutation(4))
    for array in plan:
        array.setflags(write=False)
    return plan


def seed_ssrft_forward(x: Any, seed: int, n_out: int) -> Any:
    """``S x`` for the ``n_out × D`` SSRFT of the seed (skerch 0.x ``ssrft``), on whole
    columns ``x`` (``(D,)`` or ``(D, b)``, NumPy or CuPy), in float64."""
    from curvlake.pipelines.hessian.test_matrices import _fft_module

    xp = get_namespace(x)
    x = xp.asarray(x, dtype=xp.float64)
    dim = x.shape[0]
    if not 1 <= n_out <= dim:
        raise UserInputError(f"SSRFT output size must be in [1, D={dim}], got {n_out}")
    fft = _fft_module(xp)
    pi1, sigma1, pi2, sigma2, rho = (xp.asarray(a) for a in _seed_plan(int(seed), int(dim)))
    shape = (-1,) + (1,) * (x.ndim - 1)
    y = fft.dct(x[pi1] * sigma1.reshape(shape), type=2, norm="ortho", axis=0)
    y = fft.dct(y[pi2] * sigma2.reshape(shape), type=2, norm="ortho", axis=0)
    return y[rho[:n_out]]


@dataclass(frozen=True)
class SeedSsrft:
    """The seed's ``s × D`` SSRFT ``S`` as a ``D × s`` test matrix ``Ω = Sᵀ`` (whole columns).

    Attributes:
        seed: the operator's seed (it uses ``seed .. seed + 4``).
        shape: ``(D, s)``.
    """

    seed: int
    shape: tuple[int, int]
    kind = "seed_ssrft"

    def transpose_matmul(self, x: Any, row_start: int = 0) -> Any:
        """``Ωᵀ x = S x`` (float64) for whole columns ``x`` (all ``D`` rows)."""
        if row_start != 0 or x.shape[0] != self.shape[0]:
            raise ValueError("the SSRFT acts on whole columns: pass all D rows")
        return seed_ssrft_forward(x, self.seed, self.shape[1])


# -- reading the layouts -----------------------------------------------------------------------


def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserInputError(
            "reading HDF5 files needs h5py: pip install 'curvlake[hdf5]'"
        ) from None
    return h5py


def _flag(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Layout:
    """One measurement layout (outer or inner): its files and a column reader."""

    name: str
    files: list[Path]
    length: int
    n_columns: int
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]


def _merged_layout(path: Path, name: str, ok_flag: str) -> _Layout | None:
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        if "data" not in f or "flags" not in f or f["data"].ndim != 2:
            raise UserInputError(f"{path} is not a merged skerch layout (datasets data, flags)")
        length, n_columns = f["data"].shape
        dtype = np.dtype(f["data"].dtype)
        flags = [_flag(v) for v in f["flags"][:]]
    if len(flags) != n_columns or any(flag != ok_flag for flag in flags):
        return None

    def read(start: int, stop: int) -> np.ndarray:
        with h5py.File(path, "r") as f:
            return np.asarray(f["data"][:, start:stop])

    return _Layout(name, [path], int(length), int(n_columns), dtype, read)


def _subfile_layout(files: list[Path], name: str, ok_flag: str) -> _Layout:
    h5py = _h5py()
    bad, shapes, dtypes = [], set(), set()
    for i, path in enumerate(files):
        try:
            with h5py.File(path, "r") as f:
                shapes.add(f["data"].shape)
                dtypes.add(np.dtype(f["data"].dtype))
                flag = _flag(f["flags"][0])
        except (OSError, KeyError) as error:
            raise UserInputError(f"{path} is not a skerch measurement file: {error}") from None
        if flag != ok_flag:
            bad.append((i, flag))
    if bad:
        first, flag = bad[0]
        raise UserInputError(
            f"{len(bad)} of {len(files)} {name} measurements are not flagged {ok_flag!r} (e.g. "
            f"{files[first].name}: {flag!r}); finish them with the seed's measurement script "
            "first"
        )
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise UserInputError(f"the {name} files hold data of shapes {sorted(shapes)}, not (n,)")
    (length,) = next(iter(shapes))

    def read(start: int, stop: int) -> np.ndarray:
        columns = []
        for path in files[start:stop]:
            with h5py.File(path, "r") as f:
                columns.append(np.asarray(f["data"][:]))
        return np.stack(columns, axis=1)

    return _Layout(name, files, int(length), len(files), dtypes.pop(), read)


def _layout(directory: Path, name: str, source: str, ok_flag: str) -> _Layout:
    merged = directory / f"{name}_MERGED.h5"
    indexed = []
    for path in directory.iterdir():
        match = _SUBFILE.match(path.name)
        if match and match.group(1) == name:
            indexed.append((int(match.group(2)), path))
    subfiles = [path for _, path in sorted(indexed)]
    if [i for i, _ in sorted(indexed)] != list(range(len(indexed))):
        raise UserInputError(f"the {name}_<i>.h5 files of {directory} are not numbered 0..n-1")
    if source in ("auto", "merged") and merged.is_file():
        layout = _merged_layout(merged, name, ok_flag)
        if layout is not None:
            return layout
        if source == "merged" or not subfiles:
            raise UserInputError(
                f"{merged} has measurements not flagged {ok_flag!r} (not filled yet?); run the "
                "seed's merge step, or import the sub-files with --source subfiles"
            )
    if source == "merged":
        raise UserInputError(f"no {merged.name} in {directory}")
    if not subfiles:
        raise UserInputError(
            f"no {name}_MERGED.h5 or {name}_<i>.h5 files in {directory}: is it a skerch "
            "measurement directory (python -m skerch create_hdf5_layout)?"
        )
    return _subfile_layout(subfiles, name, ok_flag)


# -- the import --------------------------------------------------------------------------------


@validate_params(
    {
        "split": [None, *SPLIT],
        "n_examples": [None, Interval(int, 1, None)],
        "seed": [None, *SEED],
        "seed_inner_left": [None, *SEED],
        "seed_inner_right": [None, *SEED],
        "block_size": [None, Interval(int, 1, None)],
    }
)
def import_hessian_hdf5(
    lake: Lake | str,
    directory: str | Path,
    run_id: str,
    *,
    checkpoint: int = -1,
    seed: int | None = None,
    seed_inner_left: int | None = None,
    seed_inner_right: int | None = None,
    source: str = "auto",
    ok_flag: str = MEASURED,
    split: str | None = None,
    n_examples: int | None = None,
    block_size: int | None = None,
) -> str:
    """Store the seed's measurements of ``directory`` as a ``recycled`` ``hessian_sketch``.

    Args:
        lake: the lake (or its URL).
        directory: the seed's measurement directory (``--hdf5dir`` of ``create_hdf5_layout``).
        run_id: the run whose θ the Hessian was measured at (e.g. imported with
            ``curvlake runs import``); its parameter count must be ``D``.
        checkpoint: the checkpoint of that run.
        seed: the seed's ``RANDOM_SEED``: ``Φ``, ``Ψ`` get seeds ``seed + 1``, ``seed + 2``.
        seed_inner_left, seed_inner_right: the two SSRFT seeds, instead of ``seed``.
        source: ``merged`` files, ``subfiles``, or ``auto`` (merged when complete).
        ok_flag: the flag every measurement must carry.
        split, n_examples: what the Hessian averaged over, if known (recorded only).
        block_size: columns copied per step and per stored chunk.

    Returns:
        The ``hessian_sketch`` id (a function of the files' contents, the seeds and the run).
    """
    lake = as_lake(lake)
    if source not in _SOURCES:
        raise UserInputError(f"source={source!r} is not valid: must be one of {_SOURCES}")
    if (seed is None) == (seed_inner_left is None or seed_inner_right is None):
        raise UserInputError(
            "give the seed's RANDOM_SEED as seed, or both seed_inner_left and seed_inner_right"
        )
    left = seed + 1 if seed_inner_left is None else seed_inner_left
    right = seed + 2 if seed_inner_right is None else seed_inner_right
    run = resolve_run(lake, run_id, needs_data=False)
    checkpoint = run.checkpoint_index(checkpoint)
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"no such directory: {directory}")
    outer = _layout(directory, "leftouter", source, ok_flag)
    inner = _layout(directory, "inner", source, ok_flag)
    k, s, dim = outer.n_columns, inner.n_columns, outer.length
    if dim != run.n_params:
        raise UserInputError(
            f"the outer measurements have D={dim} entries, run {run_id} has {run.n_params} "
            "parameters"
        )
    if inner.length != s or not 1 <= k <= s <= dim:
        raise UserInputError(
            f"the inner measurements are {inner.length} x {s} with k={k} outer ones: a "
            "recycled sketch needs an s x s inner sketch with k <= s <= D"
        )
    config = {
        "source": "skerch0_hdf5",
        "sha256": file_sha256(*outer.files, *inner.files),
        "seed_inner_left": int(left),
        "seed_inner_right": int(right),
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": n_examples,
    }
    writer = lake.begin("hessian_sketch", config, [run_id])
    if writer.complete:
        return writer.id
    dtype = outer.dtype if outer.dtype in (np.float32, np.float64) else np.dtype("float32")
    b = resolve_block_size(block_size, dim, dtype.name, lake.chunk_bytes)
    rows = param_block_rows(dim, k, lake.chunk_bytes)
    with writer:
        target = writer.create_array("outer", (dim, k), dtype, chunks=(rows, b))
        copied = writer.progress("columns", -(-k // b))
        for block in copied.pending():
            start, stop = block * b, min(k, (block + 1) * b)
            target[:, start:stop] = outer.read(start, stop).astype(dtype)
            copied.mark_done(block)
        table = run.layer_table()
        writer.write_many({"inner": inner.read(0, s).astype(np.float64), **table_arrays(table)})
        writer.set_attrs(
            recovery="recycled",
            noise="seed_ssrft",
            seed=seed,
            seed_inner_left=int(left),
            seed_inner_right=int(right),
            k=k,
            s=s,
            power_iters=0,
            n_probes=0,
            n_params=dim,
            n_hvps=s,
            n_passes=1,
            n_data_passes=None,
            run=run_id,
            checkpoint=checkpoint,
            epoch=run.checkpoint_epochs[checkpoint],
            split=split,
            n_examples=n_examples,
            param_block_size=rows,
            dtype=dtype.name,
            parameter_fingerprint=table.fingerprint,
            imported_from=str(directory),
        )
    return writer.commit()
