"""Markers that skip tests whose optional dependency is missing (xarray's ``requires_X``)."""

import importlib
import importlib.util

import pytest


def importorskip_marker(module: str, *, lazy: bool = False) -> tuple[bool, pytest.MarkDecorator]:
    """Return ``(has_module, requires_module)`` for an optional dependency.

    The module is imported, so a broken install counts as absent; ``lazy`` only looks it up
    (for peers that take seconds to import: every test session would pay for it).
    """
    if lazy:
        has = importlib.util.find_spec(module) is not None
    else:
        try:
            importlib.import_module(module)
            has = True
        except Exception:  # a broken install (e.g. cupy without CUDA) counts as absent
            has = False
    return has, pytest.mark.skipif(not has, reason=f"requires {module}")


def _has_cuda_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


has_cupy = _has_cuda_gpu()
requires_cupy = pytest.mark.skipif(not has_cupy, reason="requires cupy and a CUDA GPU")
has_dask_cuda, requires_dask_cuda = importorskip_marker("dask_cuda")
has_backpack, requires_backpack = importorskip_marker("backpack", lazy=True)
has_jobqueue, requires_jobqueue = importorskip_marker("dask_jobqueue")
has_h5py, requires_h5py = importorskip_marker("h5py")
has_curvlinops, requires_curvlinops = importorskip_marker("curvlinops", lazy=True)
has_skerch, requires_skerch = importorskip_marker("skerch", lazy=True)
has_delve, requires_delve = importorskip_marker("delve", lazy=True)
