"""One way to get a Dask client: an existing scheduler, SLURM, local CUDA, local CPU, or sync.

Pipelines never build clusters themselves: the CLI (or a library user) calls :func:`get_client`
once, and pipelines submit to ``distributed.get_client()`` if a client exists, else run in the
calling process (``cluster="sync"``, for debugging and tiny jobs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask

from curvlake.errors import UserInputError
from curvlake.progress import progress_bar

CLUSTERS = ("auto", "local", "cuda", "slurm", "sync")


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def get_client(
    address: str | None = None,
    scheduler_file: str | None = None,
    cluster: str = "auto",
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int = "auto",
    **cluster_kwargs: Any,
):
    """Connect to or start the Dask cluster that runs pipelines.

    Order: an existing scheduler (``address`` or ``scheduler_file``); else ``cluster``:
    ``slurm`` (dask-jobqueue ``SLURMCluster``; ``cluster_kwargs`` go to it, ``n_workers`` jobs),
    ``cuda`` (dask-cuda ``LocalCUDACluster``, one worker per GPU, ``GPU`` resource), ``local``
    (``LocalCluster`` of processes sized to the machine), ``sync`` (no cluster: returns None and
    computations run in this process). ``auto`` picks ``cuda`` when GPUs and dask-cuda are
    present, else ``local``.

    Returns:
        A ``distributed.Client`` (closing it closes a cluster it started), or None for ``sync``.

    Raises:
        UserInputError: an unknown cluster name, or a cluster whose package is not installed.
    """
    if cluster not in CLUSTERS:
        raise UserInputError(f"unknown cluster {cluster!r}; choose one of {', '.join(CLUSTERS)}")
    if n_workers is not None and n_workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {n_workers}")
    from distributed import Client, LocalCluster

    if address or scheduler_file:
        return _connect(address, scheduler_file)
    if cluster == "sync":
        return None
    if cluster == "auto":
        cluster = "cuda" if _gpu_count() and _has_module("dask_cuda") else "local"
    if cluster == "slurm":
        if not _has_module("dask_jobqueue"):
            raise UserInputError(
                "--cluster slurm needs dask-jobqueue: pip install 'curvlake[slurm]'"
            )
        from dask_jobqueue import SLURMCluster

        slurm = SLURMCluster(**cluster_kwargs)
        slurm.scale(jobs=n_workers or 1)
        return Client(slurm)
    if cluster == "cuda":
        if not _has_module("dask_cuda") or not _gpu_count():
            raise UserInputError(
                "--cluster cuda needs a CUDA GPU, cupy and dask-cuda: pip install 'curvlake[gpu]'"
            )
        from dask_cuda import LocalCUDACluster

        cuda = LocalCUDACluster(
            threads_per_worker=1, resources={"GPU": 1}, memory_limit=memory_limit, **cluster_kwargs
        )
        return Client(cuda)
    cores = os.cpu_count() or 1
    n_workers = n_workers or max(1, min(cores, 4))
    threads_per_worker = threads_per_worker or max(1, cores // n_workers)
    local = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=cluster_kwargs.pop("processes", True),
        memory_limit=memory_limit,
        # A free port: a fixed one warns "port in use" whenever two commands run at once.
        dashboard_address=cluster_kwargs.pop("dashboard_address", ":0"),
        silence_logs=cluster_kwargs.pop("silence_logs", logging.ERROR),
        **cluster_kwargs,
    )
    return Client(local)


#: How long to wait for an existing scheduler before saying it cannot be reached.
CONNECT_TIMEOUT = "5s"


def _connect(address: str | None, scheduler_file: str | None):
    """A client of an existing scheduler; a one-line error when it cannot be reached."""
    from distributed import Client

    if address and scheduler_file:
        raise UserInputError("give either a scheduler address or a scheduler file, not both")
    if scheduler_file and not os.path.isfile(scheduler_file):
        raise UserInputError(f"scheduler file {scheduler_file} does not exist")
    if address and "://" not in address and ":" not in address:
        raise UserInputError(
            f"scheduler address {address!r} is not like tcp://host:8786 (or host:8786)"
        )
    where = address or f"the address in {scheduler_file}"
    try:
        return Client(address, scheduler_file=scheduler_file, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(
            f"cannot reach the Dask scheduler at {where} within {CONNECT_TIMEOUT} ({reason[:160]})"
        ) from None


def _close(client, started_cluster: bool) -> None:
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None and started_cluster:
        cluster.close()


class _LazyClient:
    """A cluster started on first use: commands that refuse their input, or find their
    artifact complete, never start one."""

    def __init__(self, kwargs: dict[str, Any]):
        self.kwargs = kwargs
        self.client = None

    def get(self):
        if self.client is None:
            self.client = get_client(**self.kwargs)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            _close(self.client, self.kwargs.get("address") is None)
            self.client = None


_LAZY: list[_LazyClient] = []


@contextlib.contextmanager
def client_session(lazy: bool = False, **kwargs: Any) -> Iterator[Any]:
    """``get_client`` as a context manager; ``sync`` also sets dask's synchronous scheduler.

    With ``lazy=True`` (the command line) the cluster starts when a pipeline first asks for
    it (:func:`current_client`), so bad input is refused before any cluster is started; the
    session then yields None.
    """
    if kwargs.get("cluster") == "sync" and not (
        kwargs.get("address") or kwargs.get("scheduler_file")
    ):
        get_client(**kwargs)  # validates the options
        with dask.config.set(scheduler="synchronous"):
            yield None
        return
    if lazy:
        session = _LazyClient(kwargs)
        _LAZY.append(session)
        try:
            yield None
        finally:
            _LAZY.remove(session)
            session.close()
        return
    client = get_client(**kwargs)
    try:
        yield client
    finally:
        _close(client, kwargs.get("address") is None)


def torch_device() -> str:
    """The torch device for a task on this worker: ``cuda`` where a GPU is visible, else ``cpu``.

    dask-cuda gives each worker process one GPU (``CUDA_VISIBLE_DEVICES``), so ``cuda`` is it.
    """
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def current_client():
    """The active ``distributed.Client`` (starting a lazy session's cluster), or None (run in
    this process)."""
    if _LAZY:
        return _LAZY[-1].get()
    try:
        from distributed import get_client as _get

        return _get()
    except ValueError:
        return None


def gpu_resources(client) -> dict[str, int] | None:
    """``{"GPU": 1}`` when some worker of ``client`` advertises a ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


def memory_budget() -> int:
    """Bytes of memory the computation may use: the workers' total ``memory_limit``.

    With no client (``sync``) it is this machine's available memory. Workers without a limit
    share their host's memory: each such host counts once, with this machine's total (the
    scheduler does not report a remote host's size).
    """
    import psutil

    client = current_client()
    if client is None:
        return int(psutil.virtual_memory().available)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    limited = sum(w.get("memory_limit") or 0 for w in workers)
    unlimited_hosts = {w.get("host") for w in workers if not w.get("memory_limit")}
    return int(limited + len(unlimited_hosts) * psutil.virtual_memory().total)


def run_tasks(
    function: Callable[..., Any],
    tasks: Sequence[tuple],
    *,
    description: str,
    on_result: Callable[[Any, Any], None] | None = None,
    resources: dict[str, int] | None = None,
    progress: bool = True,
) -> None:
    """Run ``function(*args)`` for every ``args`` in ``tasks`` on the current client.

    Without a client they run here, in order. Each task writes its own (owned) chunks and marks
    its progress block itself, so an interruption loses at most the tasks in flight.
    ``on_result(args, result)`` is called in this process as results arrive. ``resources``
    default: ``{"GPU": 1}`` on a cluster whose workers advertise GPUs (dask-cuda, or workers
    started with ``--resources GPU=1``), so each task holds one GPU; none otherwise.
    """
    bar = progress_bar(
        total=len(tasks), desc=description, unit="task", disable=not progress or not tasks
    )
    client = current_client()
    if resources is None and client is not None:
        resources = gpu_resources(client)
    try:
        if client is None:
            for args in tasks:
                result = function(*args)
                if on_result:
                    on_result(args, result)
                bar.update()
            return
        from distributed import as_completed

        futures = {
            client.submit(function, *args, pure=False, resources=resources): args for args in tasks
        }
        for future in as_completed(futures):
            result = future.result()
            if on_result:
                on_result(futures[future], result)
            bar.update()
    finally:
        bar.close()
