"""``--cluster slurm``: job settings from options or dask-jobqueue's configuration, one-line
errors, and pipelines run end to end through dask-jobqueue.

SLURM cannot run here, so ``sbatch``, ``squeue`` and ``scancel`` are stand-ins put first on
PATH: ``sbatch`` starts the job script on this machine, in a process group of its own whose
id is the job id; ``squeue`` lists the jobs still running; ``scancel`` ends a job's group.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import stat
import textwrap
from pathlib import Path

import dask
import numpy as np
import pytest
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.engine import client_session, get_client, slurm_cluster_kwargs
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from tests._markers import requires_jobqueue

pytestmark = requires_jobqueue

#: Scheduler and workers talk over loopback only.
LOOPBACK = {"jobqueue.slurm.scheduler-options": {"host": "127.0.0.1"}}


@pytest.fixture
def dask_config_dir(tmp_path, monkeypatch):
    """dask's configuration read from an empty directory only (not the user's files, not
    DASK_* variables); restored afterwards."""
    saved = copy.deepcopy(dask.config.config)
    directory = tmp_path / "dask-config"
    directory.mkdir()
    monkeypatch.setattr(dask.config, "PATH", str(directory))
    _refresh(directory)
    yield directory
    dask.config.config.clear()
    dask.config.config.update(saved)


def _refresh(directory: Path) -> None:
    dask.config.refresh(paths=[str(directory)], env={})


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class FakeSlurm:
    """Stand-in SLURM commands in ``bin``, their jobs' scripts and output in ``jobs``."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.jobs = root / "jobs"
        self.bin.mkdir()
        self.jobs.mkdir()
        jobs = self.jobs
        _script(
            self.bin / "sbatch",
            f"""\
            # Copy the script (dask-jobqueue deletes it), start it in a new session: its pid is
            # the job id, its process group the job.
            script=$(mktemp "{jobs}/script.XXXXXX")
            cp "$1" "$script"
            setsid sh -c 'exec bash "$0" > "$1/slurm-$$.out" 2>&1' "$script" "{jobs}" \\
                < /dev/null &
            touch "{jobs}/$!.job"
            echo "Submitted batch job $!"
            """,
        )
        _script(
            self.bin / "squeue",
            f"""\
            # The jobs whose process is alive (not a zombie), as `squeue --format='%i %T'`.
            for file in "{jobs}"/*.job; do
                [ -e "$file" ] || continue
                job=$(basename "$file" .job)
                state=$(cut -d' ' -f3 "/proc/$job/stat" 2>/dev/null)
                [ -n "$state" ] && [ "$state" != Z ] && echo "$job RUNNING"
            done
            exit 0
            """,
        )
        _script(
            self.bin / "scancel",
            f"""\
            # End the process group of each job started by the stand-in sbatch.
            for job in "$@"; do
                [ -e "{jobs}/$job.job" ] || continue
                kill -TERM -- "-$job" 2>/dev/null
                touch "{jobs}/$job.cancelled"
            done
            exit 0
            """,
        )

    def job_ids(self) -> list[int]:
        return sorted(int(path.stem) for path in self.jobs.glob("*.job"))

    def cancelled(self) -> list[int]:
        return sorted(int(path.stem) for path in self.jobs.glob("*.cancelled"))

    def kill_all(self) -> None:
        for job in self.job_ids():
            try:
                os.killpg(job, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch, dask_config_dir):
    slurm = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{slurm.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    with dask.config.set(LOOPBACK):
        yield slurm
    slurm.kill_all()  # whatever scancel left: no worker outlives the test


# -- job settings, without starting anything ---------------------------------------------------


def test_kwargs_carry_the_options(dask_config_dir):
    kwargs = slurm_cluster_kwargs(
        cores=4,
        memory="16GB",
        walltime="02:00:00",
        partition="gpu",
        account="proj42",
        job_extra_directives=("--gres=gpu:1", "--constraint=a100"),
        processes=2,
        python="/opt/env/bin/python",
        local_directory="$TMPDIR",
        log_directory="logs",
    )
    assert kwargs == {
        "cores": 4,
        "memory": "16GB",
        "walltime": "02:00:00",
        "queue": "gpu",
        "account": "proj42",
        "job_extra_directives": ["--gres=gpu:1", "--constraint=a100"],
        "processes": 2,
        "python": "/opt/env/bin/python",
        "local_directory": "$TMPDIR",
        "log_directory": "logs",
        "scheduler_options": {"dashboard_address": ":0"},
    }


def test_options_override_the_config_file(dask_config_dir):
    (dask_config_dir / "jobqueue.yaml").write_text(
        "jobqueue:\n  slurm:\n    cores: 8\n    memory: 32GB\n    account: from-file\n"
        "    scheduler-options: {host: 127.0.0.1}\n"
    )
    _refresh(dask_config_dir)
    assert slurm_cluster_kwargs() == {
        "scheduler_options": {"dashboard_address": ":0", "host": "127.0.0.1"}
    }
    kwargs = slurm_cluster_kwargs(account="from-option", scheduler_options={"port": 0})
    assert kwargs["account"] == "from-option" and "cores" not in kwargs
    assert kwargs["scheduler_options"] == {
        "dashboard_address": ":0",
        "host": "127.0.0.1",
        "port": 0,
    }


def test_missing_settings_are_one_line(dask_config_dir):
    where = f"in {dask_config_dir}/jobqueue.yaml)"
    with pytest.raises(UserInputError) as missing:
        slurm_cluster_kwargs()
    assert str(missing.value) == (
        "SLURM jobs need --slurm-cores and --slurm-memory "
        f"(or jobqueue.slurm.cores and jobqueue.slurm.memory {where}"
    )
    with pytest.raises(UserInputError) as missing:
        slurm_cluster_kwargs(cores=2)
    assert str(missing.value) == f"SLURM jobs need --slurm-memory (or jobqueue.slurm.memory {where}"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"memory": "lots"}, "--slurm-memory 'lots' is not a memory size like 4GB"),
        ({"walltime": "1h"}, "--slurm-walltime '1h' is not a SLURM time"),
        ({"queue": "gpu a100"}, "--slurm-partition 'gpu a100' must be one word"),
        ({"job_extra_directives": ["gres=gpu:1"]}, "'gres=gpu:1' is not an sbatch option"),
        ({"processes": 3}, "--slurm-processes (3) exceeds the cores per job (2)"),
    ],
)
def test_bad_settings_are_refused(dask_config_dir, settings, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        slurm_cluster_kwargs(**{"cores": 2, "memory": "4GB", **settings})


def test_bad_setting_in_the_config_file_names_the_key(dask_config_dir):
    (dask_config_dir / "jobqueue.yaml").write_text(
        "jobqueue:\n  slurm:\n    cores: 2\n    memory: 4GB\n    walltime: 2 hours\n"
    )
    _refresh(dask_config_dir)
    with pytest.raises(
        UserInputError, match=r"jobqueue\.slurm\.walltime in .*jobqueue\.yaml '2 hours'"
    ):
        slurm_cluster_kwargs()


def test_cli_refuses_slurm_options_elsewhere_and_missing_settings(tmp_path, dask_config_dir):
    lake = str(tmp_path / "lake")
    open_lake(lake, create=True)
    run = CliRunner().invoke(cli, ["--lake", lake, "--slurm-memory", "2GB", "lake", "ls"])
    assert run.exit_code == 1
    assert run.output == "Error: --slurm-memory: only with --cluster slurm (not --cluster auto)\n"
    args = ["--lake", lake, "--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1"]
    run = CliRunner().invoke(cli, [*args, "--slurm-cores", "2", "lake", "ls"])
    assert run.exit_code == 1 and "--slurm-cores: not with --scheduler" in run.output
    args = ["--lake", lake, "--cluster", "slurm", "--slurm-cores", "2"]
    run = CliRunner().invoke(cli, [*args, "stats", "compute", "--run", "run-0123456789abcdef"])
    assert run.exit_code == 1 and len(run.output.splitlines()) == 1
    assert run.output.startswith("Error: SLURM jobs need --slurm-memory (or jobqueue.slurm.memory")


# -- dask-jobqueue: the job script, and failures to start --------------------------------------


def test_job_script_carries_the_options(dask_config_dir):
    from dask_jobqueue import SLURMCluster

    kwargs = slurm_cluster_kwargs(
        cores=4,
        memory="16GB",
        walltime="02:00:00",
        partition="gpu",
        account="proj42",
        job_extra_directives=["--gres=gpu:1", "--constraint=a100"],
        processes=2,
        python="/opt/env/bin/python",
        scheduler_options={"host": "127.0.0.1"},
    )
    with SLURMCluster(**kwargs) as slurm:
        script = slurm.job_script()
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH -A proj42",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=15G",  # 16 GB in SLURM's GiB, rounded up
        "#SBATCH -t 02:00:00",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --constraint=a100",
    ):
        assert line in script.splitlines()
    command = script.splitlines()[-1]
    assert command.startswith("/opt/env/bin/python -m distributed.cli.dask_worker tcp://127.0.0.1:")
    for argument in ("--nthreads 2", "--nworkers 2", "--memory-limit 7.45GiB"):
        assert argument in command


def test_sbatch_problems_are_one_line(fake_slurm, monkeypatch):
    settings = {"cluster": "slurm", "cores": 1, "memory": "1GB"}
    _script(
        fake_slurm.bin / "sbatch",
        "echo 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n",
    )
    with pytest.raises(UserInputError) as failed:
        get_client(**settings)
    assert str(failed.value) == (
        "sbatch failed (exit 1): sbatch: error: invalid partition specified: nope"
    )
    monkeypatch.setenv("PATH", str(fake_slurm.jobs))  # no sbatch at all
    with pytest.raises(UserInputError, match="submits jobs with sbatch, which is not on PATH"):
        get_client(**settings)


def test_a_job_that_ends_is_reported_at_once(fake_slurm):
    # A worker that cannot start (here: no such Python on the node) ends its job at once.
    with pytest.raises(UserInputError) as ended:
        get_client(cluster="slurm", cores=1, memory="1GB", python="/nonexistent/python")
    (job,) = fake_slurm.job_ids()
    assert str(ended.value) == (
        f"SLURM job(s) {job} ended before a Dask worker joined: see slurm-{job}.out"
    )
    assert fake_slurm.cancelled() == [job]
    assert "/nonexistent/python" in (fake_slurm.jobs / f"slurm-{job}.out").read_text()


def test_no_worker_within_the_timeout(fake_slurm):
    # A job that stays in the queue: sbatch accepts it, squeue says PENDING.
    _script(fake_slurm.bin / "sbatch", "echo 'Submitted batch job 4242'\n")
    _script(fake_slurm.bin / "squeue", "echo '4242 PENDING'\n")
    with pytest.raises(UserInputError) as late:
        get_client(cluster="slurm", cores=1, memory="1GB", job_timeout=1.5)
    assert str(late.value).startswith(
        "no Dask worker joined within 1.5 s (SLURM job(s): 4242 PENDING): "
        "wait longer with --slurm-job-timeout"
    )


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_lake(tmp_path_factory):
    from curvlake.pipelines.train import run_train

    path = tmp_path_factory.mktemp("slurm-lake") / "lake"
    lake = open_lake(path, create=True)
    config = {
        "model": "mlp",
        "model_params": {"widths": [8]},
        "dataset": "digits",
        "epochs": 1,
        "device": "cpu",
    }
    return path, run_train(lake, config)


def _copy(lake_path: Path, into: Path) -> str:
    shutil.copytree(lake_path, into)
    return str(into)


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_stats_through_slurm_jobs_equal_a_local_cluster(fake_slurm, trained_lake, tmp_path, jobs):
    from curvlake.pipelines.jacobian_stats.pipeline import run_stats

    lake_path, run_id = trained_lake
    # Two blocks of examples at the last checkpoint: a few tasks, not a few dozen.
    options = {"metrics": ["jacobian_operator", "cross_entropy"], "checkpoints": [-1]}
    options["block_size"] = 768
    local_lake = _copy(lake_path, tmp_path / "local")
    with client_session(cluster="local", n_workers=1, threads_per_worker=1, processes=False):
        local_id = run_stats(local_lake, [run_id], progress=False, **options)

    slurm_lake = _copy(lake_path, tmp_path / "slurm")
    args = ["--lake", slurm_lake, "--cluster", "slurm", "--workers", str(jobs)]
    args += ["--slurm-cores", "1", "--slurm-memory", "2GB", "--slurm-walltime", "10"]
    args += ["stats", "compute", "--run", run_id, "--checkpoints", "-1", "--block-size", "768"]
    args += ["--metric", "jacobian_operator", "--metric", "cross_entropy"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    slurm_id = result.stdout.splitlines()[0]

    assert len(fake_slurm.job_ids()) == jobs
    assert fake_slurm.cancelled() == fake_slurm.job_ids()  # closing the session cancelled them
    log = (fake_slurm.jobs / f"slurm-{fake_slurm.job_ids()[0]}.out").read_text()
    assert "Registered to:" in log  # the job's worker joined: the only worker, it ran the tasks
    script = next(fake_slurm.jobs.glob("script.*")).read_text()
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH -t 10" in script
    assert slurm_id == local_id
    expected, got = open_lake(local_lake).open(local_id), open_lake(slurm_lake).open(slurm_id)
    assert got.sizes == expected.sizes and got.sizes["example"] > 768
    for name in options["metrics"]:
        np.testing.assert_array_equal(got[name].values, expected[name].values)
