"""Time to write the lake report of a lake of N artifacts, and the report's size.

    python benchmarks/report.py                 # 100 artifacts, default settings
    python benchmarks/report.py --format png --format svg
    python benchmarks/report.py --artifacts 40 --jobs 2 --format png

Builds the synthetic lake of the report tests (``tests/report/cases.py``: every kind, tiny
arrays, artifacts that refer to each other as real ones do, plus a failed, an interrupted and
an unknown-kind artifact) until it holds N artifacts, then writes its report (the PNG of every
figure beside the page; ``--format png --format svg`` for SVGs too) and prints wall and CPU
time (this process and its drawing workers), the figures, the page size and the load average
of the machine during the run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.report.cases

from curvlake.lake import open_lake
from curvlake.report import write_report
from curvlake.report.build import DEFAULT_FORMATS
from tests.report.cases import add_broken, add_copy, write_mask


def build(path: Path, n_artifacts: int):
    """A synthetic lake of exactly ``n_artifacts`` artifacts (complete sets, then masks)."""
    lake = open_lake(path, create=True)
    copy = 0
    run = None
    while len(lake.list()) + 30 <= n_artifacts - 3:
        run = add_copy(lake, copy)["run"]
        copy += 1
    while len(lake.list()) < n_artifacts - 3:
        write_mask(lake, copy, run, [len(lake.list()) % 10], {"n": len(lake.list())}, "magnitude")
    add_broken(lake)
    return lake


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--format", action="append", choices=("png", "svg"), dest="formats")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        lake = build(Path(folder) / "lake", args.artifacts)
        built = time.perf_counter() - start
        load = os.getloadavg()[0]
        cpu, start = cpu_seconds(), time.perf_counter()
        formats = tuple(args.formats or DEFAULT_FORMATS)
        report = write_report(lake, Path(folder) / "report.html", formats=formats, jobs=args.jobs)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        load = max(load, os.getloadavg()[0])
        print(
            f"{report.n_artifacts} artifacts (lake built in {built:.0f} s), "
            f"{report.n_figures} figures ({report.n_inlined} inlined), "
            f"page {report.bytes / 2**20:.2f} MiB, {'+'.join(formats)} files, "
            f"jobs={args.jobs} "
            f"({os.cpu_count()} cores, load average {load:.1f}): "
            f"{wall:.1f} s wall, {cpu:.1f} s CPU"
        )


if __name__ == "__main__":
    main()
