"""The engine: one way to get a client; tasks run on a real LocalCluster or in-process."""

import time

import numpy as np
import pytest

from curvlake.engine import client_session, current_client, get_client, memory_budget, run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.progress import progress_bar


def _square_into(array, block):
    array[block] = block * block
    return block


def test_bad_cluster_options():
    with pytest.raises(UserInputError, match="unknown cluster 'kubernetes'"):
        get_client(cluster="kubernetes")
    with pytest.raises(UserInputError, match="--workers must be >= 1"):
        get_client(cluster="local", n_workers=0)
    with pytest.raises(UserInputError, match="does not exist"):
        get_client(scheduler_file="/nonexistent/scheduler.json")


def test_sync_runs_in_process(tmp_path):
    with client_session(cluster="sync") as client:
        assert client is None and current_client() is None
        seen = []
        run_tasks(
            lambda x: x + 1,
            [(1,), (2,)],
            description="t",
            progress=False,
            on_result=lambda args, r: seen.append(r),
        )
    assert seen == [2, 3]


@pytest.mark.parametrize("n_workers", [1, 2])
def test_tasks_on_local_cluster_write_owned_chunks(tmp_path, n_workers):
    lake = open_lake(tmp_path, create=True)
    writer = lake.begin("dataset", {"n_workers": n_workers})
    progress = writer.progress("blocks", 6)
    with client_session(
        cluster="local", n_workers=n_workers, threads_per_worker=1, processes=False
    ) as client:
        assert current_client() is client
        run_tasks(
            _square_into,
            [(progress.array, b) for b in progress.pending()],
            description="blocks",
            progress=False,
        )
    np.testing.assert_array_equal(progress.array[:], [0, 1, 4, 9, 16, 25])


class _Libc:
    """Records the allocator calls of ``engine.task_allocations``."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))


def test_task_allocations_hold_the_threshold_while_any_task_runs(monkeypatch):
    from curvlake import engine

    libc = _Libc()
    monkeypatch.setattr(engine, "_libc", lambda: libc)
    with engine.task_allocations():
        with engine.task_allocations():  # a second task thread of the same worker
            pass
        # it trims after itself; the threshold stays while the first task runs
        assert libc.calls == [("mallopt", -3, 32 << 20), ("malloc_trim", 0)]
    assert libc.calls[2:] == [("mallopt", -3, 128 << 10), ("malloc_trim", 0)]
    with pytest.raises(ValueError), engine.task_allocations():
        raise ValueError("a failing task restores the threshold too")
    assert libc.calls[-2:] == [("mallopt", -3, 128 << 10), ("malloc_trim", 0)]
    assert engine._tasks_running == 0


def _pinned():
    from curvlake import engine

    return engine._PINNED_MALLOC, engine._libc() is not None


def test_worker_processes_see_dasks_pinned_allocator_and_this_process_does_not():
    import sys

    from curvlake import engine

    assert engine._libc() is None  # this process's allocator adapts: nothing to change
    with client_session(cluster="local", n_workers=1, threads_per_worker=1) as client:
        (pinned,) = client.run(_pinned).values()
        assert client.submit(_pinned, pure=False).result() == pinned
    assert pinned == (True, sys.platform.startswith("linux"))


def test_memory_budget_is_the_workers_total_limit():
    import psutil

    with client_session(cluster="sync"):
        assert 0 < memory_budget() <= psutil.virtual_memory().total
    with client_session(
        cluster="local", n_workers=2, threads_per_worker=1, processes=False, memory_limit="300MB"
    ):
        assert memory_budget() == 2 * 300_000_000
    with client_session(
        cluster="local", n_workers=2, threads_per_worker=1, processes=False, memory_limit=0
    ):  # two unlimited workers on one host share it
        assert memory_budget() == psutil.virtual_memory().total


def test_progress_bar_redraws_rarely_in_logs(capsys):
    # Under pytest stderr is captured, not a terminal: a log. Over 0.6 s tqdm's default would
    # redraw ~6 times; here the bar is drawn when it opens and when it closes.
    bar = progress_bar(total=60, desc="steps")
    for _ in range(60):
        time.sleep(0.01)
        bar.update()
    bar.close()
    lines = [line for line in capsys.readouterr().err.split("\r") if "steps" in line]
    assert len(lines) == 2 and "60/60" in lines[-1]
