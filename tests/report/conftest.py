"""One synthetic lake of every kind and its report, shared by the report tests."""

import pytest

from curvlake.report import write_report
from tests.report.cases import build_lake


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """``(lake, ids)``: every kind once, plus a failed, a staged and an unknown-kind artifact."""
    return build_lake(tmp_path_factory.mktemp("report") / "lake")


@pytest.fixture(scope="session")
def report(synthetic, tmp_path_factory):
    """The report of the synthetic lake (one process)."""
    lake, _ = synthetic
    return write_report(lake, tmp_path_factory.mktemp("out") / "report.html", jobs=1)
