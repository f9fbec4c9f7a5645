"""curvlake: a Zarr data lake with Dask pipelines for looking inside trained neural networks.

Public API: :func:`open_lake` (a :class:`Lake` of artifacts, each readable as an xarray Dataset)
and :func:`load_model` (a run's checkpoint as a torch module). Every pipeline is a plain function
in :mod:`curvlake.pipelines` that the ``curvlake`` command line wraps.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curvlake")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from curvlake.lake import Lake, open_lake


def __getattr__(name: str):
    # torch is imported only when a model is asked for: reading the lake does not need it.
    if name == "load_model":
        from curvlake.lake.checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'curvlake' has no attribute {name!r}")


__all__ = ["Lake", "__version__", "load_model", "open_lake"]
