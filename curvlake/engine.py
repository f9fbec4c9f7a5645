"""One way to get a Dask client: an existing scheduler, SLURM, local CUDA, local CPU, or sync.

Pipelines never build clusters themselves: the CLI (or a library user) calls :func:`get_client`
once, and pipelines submit to ``distributed.get_client()`` if a client exists, else run in the
calling process (``cluster="sync"``, for debugging and tiny jobs).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
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
    ``slurm`` (dask-jobqueue ``SLURMCluster``, ``n_workers`` jobs; ``cluster_kwargs`` are the
    job settings of :func:`slurm_cluster_kwargs` and ``job_timeout``, see :func:`start_slurm`),
    ``cuda`` (dask-cuda ``LocalCUDACluster``, one worker per GPU, ``GPU`` resource), ``local``
    (``LocalCluster`` of processes sized to the machine), ``sync`` (no cluster: returns None and
    computations run in this process). ``auto`` picks ``cuda`` when GPUs and dask-cuda are
    present, else ``local``.

    Returns:
        A ``distributed.Client`` (closing it closes a cluster it started), or None for ``sync``.

    Raises:
        UserInputError: an unknown cluster name, a cluster whose package is not installed, or
            SLURM jobs that cannot be described, submitted or started.
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
        return start_slurm(n_workers or 1, **cluster_kwargs)
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


# -- SLURM (dask-jobqueue) ---------------------------------------------------------------------

#: Seconds ``--cluster slurm`` waits, by default, for the first job to start its worker.
SLURM_JOB_TIMEOUT = 300.0

#: Job setting -> (its command-line option, its key under ``jobqueue.slurm`` in dask's config).
SLURM_SETTINGS = {
    "cores": ("--slurm-cores", "cores"),
    "memory": ("--slurm-memory", "memory"),
    "walltime": ("--slurm-walltime", "walltime"),
    "queue": ("--slurm-partition", "queue"),
    "account": ("--slurm-account", "account"),
    "job_extra_directives": ("--slurm-directive", "job-extra-directives"),
    "processes": ("--slurm-processes", "processes"),
}

# SLURM's time formats: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_WALLTIME = re.compile(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)")

# squeue states of a job that will never start its worker.
_ENDED_STATES = (
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
)


def _jobqueue_file() -> str:
    """Where dask-jobqueue's configuration file is, as a user would type it."""
    path = os.path.join(dask.config.PATH, "jobqueue.yaml")
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def _slurm_where(name: str, explicit: bool) -> str:
    option, key = SLURM_SETTINGS[name]
    return option if explicit else f"jobqueue.slurm.{key} in {_jobqueue_file()}"


def _check_slurm_value(name: str, value: Any, where: str) -> None:
    """Refuse a job setting that sbatch or dask-jobqueue would trip over later."""
    from dask.utils import parse_bytes

    if name in ("cores", "processes"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{where} must be a whole number >= 1, got {value!r}")
    elif name == "memory":
        try:
            valid = parse_bytes(value) > 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise UserInputError(f"{where} {value!r} is not a memory size like 4GB or 500MiB")
    elif name == "walltime":
        if not _WALLTIME.fullmatch(str(value)):
            raise UserInputError(
                f"{where} {value!r} is not a SLURM time (MINUTES, HH:MM:SS or D-HH:MM:SS)"
            )
    elif name in ("queue", "account"):
        if not isinstance(value, str) or not value or value.split() != [value]:
            raise UserInputError(f"{where} {value!r} must be one word")
    elif name == "job_extra_directives":
        for directive in [value] if isinstance(value, str) else value:
            if not isinstance(directive, str) or not directive.startswith("-"):
                raise UserInputError(
                    f"{where} {directive!r} is not an sbatch option like --gres=gpu:1 "
                    "(what follows #SBATCH)"
                )


def slurm_cluster_kwargs(
    *,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
    queue: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    job_extra_directives: Sequence[str] | None = None,
    processes: int | None = None,
    python: str | None = None,
    local_directory: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of dask-jobqueue's ``SLURMCluster`` for these job settings.

    A setting given here overrides dask-jobqueue's configuration (``jobqueue.slurm.*``, read
    from ``~/.config/dask/jobqueue.yaml``; ``job_extra_directives`` replaces the configured
    list); one left None is taken from there by ``SLURMCluster``. Starts nothing.

    Args:
        cores: cores per job (``#SBATCH --cpus-per-task``), shared by its worker processes.
        memory: memory per job (``#SBATCH --mem``), e.g. ``"16GB"``.
        walltime: time limit per job (``#SBATCH -t``), e.g. ``"02:00:00"``.
        queue, partition: the partition (``#SBATCH -p``); ``partition`` is SLURM's word.
        account: the account charged (``#SBATCH -A``).
        job_extra_directives: more sbatch options, one ``#SBATCH`` line each
            (``["--gres=gpu:1", "--constraint=a100"]``).
        processes: Dask worker processes per job (default about sqrt(cores)).
        python: the Python that runs the workers on the compute nodes (default: this one).
        local_directory: worker scratch space on the nodes (e.g. ``$TMPDIR``).
        extra: other ``SLURMCluster`` arguments (``interface``, ``log_directory``,
            ``job_script_prologue``, ``scheduler_options``...), passed on as they are.

    Raises:
        UserInputError: dask-jobqueue not installed, cores or memory set nowhere, or a setting
            SLURM would refuse; the message names the command-line option or configuration key.
    """
    if not _has_module("dask_jobqueue"):
        raise UserInputError("--cluster slurm needs dask-jobqueue: pip install 'curvlake[slurm]'")
    if queue is not None and partition is not None and queue != partition:
        raise UserInputError(f"two partitions given: queue={queue!r} and partition={partition!r}")
    explicit = {
        "cores": cores,
        "memory": memory,
        "walltime": walltime,
        "queue": queue if queue is not None else partition,
        "account": account,
        "job_extra_directives": (
            list(job_extra_directives) if job_extra_directives is not None else None
        ),
        "processes": processes,
    }
    resolved = {}
    for name, value in explicit.items():
        key = SLURM_SETTINGS[name][1]
        resolved[name] = (
            value if value is not None else dask.config.get(f"jobqueue.slurm.{key}", None)
        )
    missing = [name for name in ("cores", "memory") if resolved[name] is None]
    if missing:
        options = " and ".join(SLURM_SETTINGS[name][0] for name in missing)
        keys = " and ".join(f"jobqueue.slurm.{SLURM_SETTINGS[name][1]}" for name in missing)
        raise UserInputError(f"SLURM jobs need {options} (or {keys} in {_jobqueue_file()})")
    for name, value in resolved.items():
        if value is not None:
            _check_slurm_value(name, value, _slurm_where(name, explicit[name] is not None))
    if resolved["processes"] is not None and resolved["processes"] > resolved["cores"]:
        raise UserInputError(
            f"{_slurm_where('processes', processes is not None)} ({resolved['processes']}) "
            f"exceeds the cores per job ({resolved['cores']}): each worker process needs a core"
        )
    kwargs = {name: value for name, value in explicit.items() if value is not None}
    if python is not None:
        kwargs["python"] = python
    if local_directory is not None:
        kwargs["local_directory"] = local_directory
    kwargs.update(extra)
    # Passing scheduler_options replaces the configured ones: merge them instead. A free
    # dashboard port, as for local clusters: a fixed one clashes when two commands run.
    kwargs["scheduler_options"] = {
        "dashboard_address": ":0",
        **(dask.config.get("jobqueue.slurm.scheduler-options", None) or {}),
        **(extra.get("scheduler_options") or {}),
    }
    return kwargs


def start_slurm(n_jobs: int, job_timeout: float = SLURM_JOB_TIMEOUT, **settings: Any):
    """Submit ``n_jobs`` SLURM jobs of Dask workers and wait until the first worker joins.

    ``settings`` are those of :func:`slurm_cluster_kwargs`. Pipelines can then size their work
    to the workers (:func:`memory_budget`, :func:`gpu_resources`); jobs still queued join
    later. While waiting, ``squeue`` tells whether every job already ended (a worker that
    could not start), which is reported at once rather than at the timeout.

    Returns:
        A ``distributed.Client`` of the ``SLURMCluster``; closing both cancels the jobs.

    Raises:
        UserInputError: dask-jobqueue or sbatch missing, job settings missing or refused, an
            sbatch failure, every job ended, or no worker within ``job_timeout`` seconds.
    """
    if not job_timeout > 0:
        raise UserInputError(f"--slurm-job-timeout must be > 0 seconds, got {job_timeout!r}")
    kwargs = slurm_cluster_kwargs(**settings)
    if shutil.which("sbatch") is None:
        raise UserInputError(
            "--cluster slurm submits jobs with sbatch, which is not on PATH: run curvlake on a "
            "SLURM login node"
        )
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    try:
        slurm = SLURMCluster(job_cls=_slurm_job_class(), **kwargs)
    except (ValueError, OSError) as error:
        raise UserInputError(f"cannot set up the SLURM cluster: {_first_line(error)}") from None
    try:
        slurm.scale(jobs=n_jobs)
        client = Client(slurm)
        try:
            log_directory = kwargs.get("log_directory") or dask.config.get(
                "jobqueue.slurm.log-directory", None
            )
            _wait_for_a_worker(client, slurm, job_timeout, log_directory)
        except BaseException:
            client.close()
            raise
    except BaseException:
        slurm.close()
        raise
    return client


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@functools.cache
def _slurm_job_class():
    """dask-jobqueue's SLURM job, keeping why its submission failed.

    ``scale()`` submits jobs in the background, where a failed ``sbatch`` would only be
    logged as a traceback; this job keeps the error instead, for :func:`_wait_for_a_worker`
    to report in one line.
    """
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status

    class RecordingSLURMJob(SLURMJob):
        submit_error: str | None = None

        async def start(self):
            try:
                await super().start()
            except (OSError, RuntimeError, ValueError) as error:
                self.submit_error = _sbatch_failure(error)
                # Started as far as the cluster is concerned: no job id, so close() is a no-op.
                self.status = Status.running

    return RecordingSLURMJob


def _sbatch_failure(error: Exception) -> str:
    """One line for a failed submission (dask-jobqueue raises RuntimeError on a non-zero exit,
    with the command's stdout and stderr in the message)."""
    if not isinstance(error, RuntimeError):  # sbatch not runnable, or no job id in its output
        return f"sbatch failed: {_first_line(error)}"
    text = str(error)
    code = re.search(r"Exit code: (\S+)", text)
    stderr = [line.strip() for line in text.partition("stderr:")[2].splitlines()]
    reason = "; ".join(line for line in stderr if line)[:300] or "no message"
    return f"sbatch failed (exit {code.group(1) if code else '?'}): {reason}"


def _squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """The state of each of ``job_ids`` that squeue still lists, or None if squeue cannot tell
    (not on PATH, the controller not answering)."""
    try:
        done = subprocess.run(
            ["squeue", "--noheader", "--format=%i %T", "--jobs=" + ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        # squeue refuses ids it has forgotten: jobs that ended a while ago.
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition(" ")
        if job_id in job_ids:
            states[job_id] = state.strip()
    return states


def _submitted_jobs(slurm) -> tuple[list[str], list[str]]:
    """Why submissions failed, and the ids of the jobs submitted (none while sbatch runs).

    Only strings: a job object kept alive (say, by a traceback) fails the cluster's close.
    """
    jobs = slurm.workers.values()
    return [job.submit_error for job in jobs if job.submit_error], sorted(
        {job.job_id for job in jobs if job.job_id}
    )


def _wait_for_a_worker(client, slurm, timeout: float, log_directory: str | None) -> None:
    """Return when a worker has joined; raise when every job ended, or at the timeout."""
    deadline = time.monotonic() + timeout
    interval = 1.0  # between squeue calls, growing: the SLURM controller is shared
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.1, min(interval, deadline - time.monotonic())))
            return
        except TimeoutError:
            pass
        failed, job_ids = _submitted_jobs(slurm)
        if failed:
            raise UserInputError(failed[0])
        states = _squeue_states(job_ids) if job_ids else None
        if states is not None and all(state.startswith(_ENDED_STATES) for state in states.values()):
            first = job_ids[0]
            output = f"{log_directory}/*-{first}.err" if log_directory else f"slurm-{first}.out"
            known = ", ".join(f"{job} {state}" for job, state in states.items())
            raise UserInputError(
                f"SLURM job(s) {', '.join(job_ids)} ended before a Dask worker joined"
                f"{f' ({known})' if known else ''}: see {output}"
            )
        if time.monotonic() >= deadline:
            jobs = ", ".join(
                job if states is None else f"{job} {states.get(job, 'ended')}" for job in job_ids
            )
            raise UserInputError(
                f"no Dask worker joined within {timeout:g} s (SLURM job(s): {jobs or 'none'}): "
                "wait longer with --slurm-job-timeout, or see squeue and the jobs' output"
            )
        interval = min(2 * interval, 10.0)


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
    if lazy and not (kwargs.get("address") or kwargs.get("scheduler_file")):
        # An existing scheduler is connected to at once (that starts nothing): an unreachable
        # one is refused before a pipeline stages anything.
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


# -- the allocator of task code in Dask workers -----------------------------------------------

#: glibc's ``mallopt`` parameter of the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: glibc's default mmap threshold, where it stays when any ``MALLOC_*`` threshold is set.
_GLIBC_MMAP_THRESHOLD = 128 << 10
#: The mmap threshold while curvlake tasks run in a worker: glibc's own adaptive maximum.
TASK_MMAP_THRESHOLD = 32 << 20
# Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (so that they give
# freed memory back); setting any malloc threshold also pins glibc's mmap threshold at 128 KiB,
# so every buffer above that, e.g. each activation of a forward pass, is a fresh ``mmap``
# faulted in page by page and unmapped after use (torch's HVPs of a small CNN: 1.4x slower in
# a worker than in process, benchmarks/RESULTS.md). Read when this module is imported: in a
# worker the variable is already set, in the process that starts a LocalCluster it is not
# (the nanny exports it there afterwards, but that process's allocator never saw it).
_PINNED_MALLOC = (
    "MALLOC_TRIM_THRESHOLD_" in os.environ and "MALLOC_MMAP_THRESHOLD_" not in os.environ
)
_task_lock = threading.Lock()
_tasks_running = 0


def _libc() -> Any:
    """glibc, where its allocator was pinned as above; None elsewhere (macOS, musl, sync)."""
    if not _PINNED_MALLOC:
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def task_allocations() -> Iterator[None]:
    """While curvlake tasks run in a Dask worker, buffers below :data:`TASK_MMAP_THRESHOLD`
    come from the heap (reused between batches) instead of fresh mappings; every task ends
    with ``malloc_trim(0)``, which hands the freed heap back, and when the last running task
    of the process ends the threshold goes back to 128 KiB, so a worker's memory between tasks
    is what Dask's setting gives. Setting the variable for the whole worker instead keeps
    freed heap memory resident, and a memory-limited worker then stays paused (seen: the
    probes out-of-core benchmark stalled at 80 % of its limit). No-op outside such workers."""
    global _tasks_running
    libc = _libc()
    if libc is None:
        yield
        return
    with _task_lock:
        if _tasks_running == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, TASK_MMAP_THRESHOLD)
        _tasks_running += 1
    try:
        yield
    finally:
        with _task_lock:
            _tasks_running -= 1
            if _tasks_running == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)
        # after every task, also while others run (threads of one worker overlap): what this
        # task freed goes back to the OS before the worker's memory is next measured
        libc.malloc_trim(0)


def _run_task(function: Callable[..., Any], *args: Any) -> Any:
    with task_allocations():
        return function(*args)


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
    ``on_result(args, result)`` is called in this process as results arrive; in workers the
    tasks run under :func:`task_allocations`. ``resources``
    default: ``{"GPU": 1}`` on a cluster whose workers advertise GPUs (dask-cuda, or workers
    started with ``--resources GPU=1``), so each task holds one GPU; none otherwise.
    """
    client = current_client()  # first: a lazy cluster that fails to start leaves no bar behind
    if resources is None and client is not None:
        resources = gpu_resources(client)
    bar = progress_bar(
        total=len(tasks), desc=description, unit="task", disable=not progress or not tasks
    )
    try:
        if client is None:
            for args in tasks:
                result = function(*args)
                if on_result:
                    on_result(args, result)
                bar.update()
            return
        from distributed import as_completed

        name = getattr(function, "__name__", "task")
        futures = {
            client.submit(
                _run_task, function, *args, key=f"{name}-{uuid.uuid4().hex}", resources=resources
            ): args
            for args in tasks
        }
        for future in as_completed(futures):
            result = future.result()
            if on_result:
                on_result(futures[future], result)
            bar.update()
    finally:
        bar.close()
