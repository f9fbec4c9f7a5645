"""Markers that skip tests whose optional dependency is missing (xarray's ``requires_X``)."""

import importlib
import importlib.util

import pytest


def importorskip_marker(module: str) -> tuple[bool, pytest.MarkDecorator]:
    """Return ``(has_module, requires_module)`` for an optional dependency."""
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
has_backpack, requires_backpack = importorskip_marker("backpack")
has_jobqueue, requires_jobqueue = importorskip_marker("dask_jobqueue")
has_h5py, requires_h5py = importorskip_marker("h5py")
has_curvlinops, requires_curvlinops = importorskip_marker("curvlinops")
has_skerch, requires_skerch = importorskip_marker("skerch")
has_delve, requires_delve = importorskip_marker("delve")
