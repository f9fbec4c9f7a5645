"""The CLI: lake commands, and user errors as one line without a traceback."""

from click.testing import CliRunner

from curvlake.cli import cli
from tests.lake._block_writer import write_matrix


def _run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_version():
    result = _run("--version")
    assert result.exit_code == 0 and "curvlake, version" in result.output


def test_lake_commands(tmp_path):
    lake = str(tmp_path / "lake")
    assert "lake ready" in _run("--lake", lake, "lake", "init").output
    assert "the lake is empty" in _run("--lake", lake, "lake", "ls").output
    art, _ = write_matrix(lake, 2)
    listing = _run("lake", "ls", env={"CURVLAKE_LAKE": lake}).output
    assert art in listing and "complete" in listing
    shown = _run("--lake", lake, "lake", "show", art).output
    assert "dense" in shown and "xarray.open_zarr" in shown
    assert f"ok      {art}" in _run("--lake", lake, "lake", "validate").output
    assert "removed 0 item(s)" in _run("--lake", lake, "lake", "gc").output


def test_user_errors_are_one_line(tmp_path):
    result = _run("--lake", str(tmp_path / "nolake"), "lake", "ls")
    assert result.exit_code == 1
    assert "is not a curvlake lake" in result.output and "Traceback" not in result.output
    _run("--lake", str(tmp_path / "lake"), "lake", "init")
    result = _run("--lake", str(tmp_path / "lake"), "lake", "show", "run-0123456789abcdef")
    assert result.exit_code == 1 and "no artifact 'run-0123456789abcdef'" in result.output
    result = _run("--lake", str(tmp_path / "lake"), "lake", "ls", "--kind", "nope")
    assert result.exit_code == 1 and "unknown artifact kind 'nope'" in result.output


def test_yaml_numbers_as_users_write_them():
    from curvlake._yaml import load_yaml

    assert load_yaml("lr: 1e-3\nwd: 5E-4\nk: 8\nwidths: [64, 32]\nname: 1e3x") == {
        "lr": 0.001,
        "wd": 0.0005,
        "k": 8,
        "widths": [64, 32],
        "name": "1e3x",
    }
