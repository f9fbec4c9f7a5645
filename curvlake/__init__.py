"""curvlake: a Zarr data lake with Dask pipelines for looking inside trained neural networks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curvlake")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from curvlake.lake import Lake, open_lake  # noqa: E402

__all__ = ["Lake", "__version__", "open_lake"]
