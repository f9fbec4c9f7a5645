"""The lake lifecycle: ids, catalog, kill and resume, corruption, schema versions, gc."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from curvlake.errors import (
    ArtifactNotFoundError,
    CorruptChunkError,
    IncompleteArtifactError,
    LakeError,
    SchemaError,
)
from curvlake.lake import artifact_id, create_work_array, open_lake, write_regions
from tests.lake._block_writer import ROWS_PER_BLOCK, write_matrix

REPO = Path(__file__).resolve().parents[2]


def _spawn_writer(lake_path, n_blocks, delay):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.lake._block_writer",
            str(lake_path),
            str(n_blocks),
            str(delay),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_open_lake_errors(tmp_path):
    with pytest.raises(LakeError, match="not a curvlake lake"):
        open_lake(tmp_path)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "file.txt").write_text("x")
    with pytest.raises(LakeError, match="not empty"):
        open_lake(tmp_path / "stuff", create=True)
    lake_dir = tmp_path / "lake"
    open_lake(lake_dir, create=True)
    (lake_dir / "lake.json").write_text(
        json.dumps({"format": "curvlake-lake", "format_version": "9.0"})
    )
    with pytest.raises(LakeError, match=r"format version 9\.0"):
        open_lake(lake_dir)


def test_ids_are_stable_and_config_sensitive():
    a = artifact_id("run", {"lr": 0.1, "widths": (4, 2)}, ["dataset-0123456789abcdef"])
    assert a == artifact_id("run", {"widths": [4, 2], "lr": 0.1}, ["dataset-0123456789abcdef"])
    assert a != artifact_id("run", {"lr": 0.2, "widths": (4, 2)}, ["dataset-0123456789abcdef"])
    assert a != artifact_id("run", {"lr": 0.1, "widths": (4, 2)})
    assert a.startswith("run-") and len(a) == len("run-") + 16


def test_catalog_and_missing(tmp_path):
    lake = open_lake(tmp_path, create=True)
    art, computed = write_matrix(str(tmp_path), 3)
    assert computed == [0, 1, 2]
    (info,) = lake.list("pefs", demo="matrix")
    assert info.id == art and info.status == "complete" and info.config["n_blocks"] == 3
    assert lake.list("pefs", demo="other") == []
    assert lake.list("run") == []
    with pytest.raises(ArtifactNotFoundError, match="pefs-0000000000000000"):
        lake.open("pefs-0000000000000000")
    # A rerun with the same config reuses the artifact.
    assert write_matrix(str(tmp_path), 3) == (art, [])


def test_sigkill_mid_artifact_then_resume(tmp_path):
    reference, _ = write_matrix(str(tmp_path / "reference"), 8)
    lake_path = tmp_path / "lake"
    process = _spawn_writer(lake_path, 8, delay=0.3)
    done = []
    while len(done) < 3:
        done.append(int(process.stdout.readline()))
    process.send_signal(signal.SIGKILL)
    process.wait()
    lake = open_lake(lake_path)
    art = lake.list("pefs")[0].id
    assert lake.info(art).status == "writing"
    with pytest.raises(IncompleteArtifactError, match="rerun the command"):
        lake.open(art)
    assert not (lake_path / "pefs" / art).exists()  # never readable as complete

    resumed_art, computed = write_matrix(str(lake_path), 8)
    assert resumed_art == art == reference
    assert set(computed).isdisjoint(done[: len(done) - 1])  # finished blocks are not recomputed
    assert len(computed) <= 8 - (len(done) - 1)
    expected = open_lake(tmp_path / "reference").open(reference)
    got = lake.open(art)
    np.testing.assert_array_equal(got["dense"].values, expected["dense"].values)
    np.testing.assert_array_equal(got["dense_norm"].values, expected["dense_norm"].values)


def test_concurrent_writer_of_same_artifact_is_refused(tmp_path):
    process = _spawn_writer(tmp_path, 50, delay=0.2)
    process.stdout.readline()
    try:
        with pytest.raises(LakeError, match="being written by process"):
            write_matrix(str(tmp_path), 50)
    finally:
        process.kill()
        process.wait()


def test_two_processes_write_different_artifacts(tmp_path):
    open_lake(tmp_path, create=True)
    processes = [_spawn_writer(tmp_path, n, delay=0.05) for n in (5, 6)]
    for process in processes:
        process.communicate(timeout=120)
        assert process.returncode == 0
    infos = open_lake(tmp_path).list("pefs")
    assert sorted(i.config["n_blocks"] for i in infos) == [5, 6]
    assert all(i.status == "complete" for i in infos)


def test_corrupted_chunk_is_detected(tmp_path):
    lake = open_lake(tmp_path, create=True)
    art, _ = write_matrix(str(tmp_path), 3)
    chunk = tmp_path / "pefs" / art / "dense" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match=f"artifact {art}: array 'dense'"):
        lake.open(art)["dense"].load()
    with pytest.raises(CorruptChunkError, match="'dense'"):
        lake.validate(art)
    # Chunks that are intact still read.
    assert lake.open(art)["dense"][:ROWS_PER_BLOCK].values.shape == (ROWS_PER_BLOCK, 6)


@pytest.mark.parametrize("version", ["2.0", None])
def test_wrong_or_missing_schema_version_refused(tmp_path, version):
    lake = open_lake(tmp_path, create=True)
    art, _ = write_matrix(str(tmp_path), 2)
    group = zarr.open_group(tmp_path / "pefs" / art, mode="r+", use_consolidated=False)
    if version is None:
        del group.attrs["curvlake:schema_version"]
    else:
        group.attrs["curvlake:schema_version"] = version
    zarr.consolidate_metadata(group.store)
    with pytest.raises(SchemaError, match="schema version"):
        lake.open(art)


def test_newer_minor_version_is_read(tmp_path):
    lake = open_lake(tmp_path, create=True)
    art, _ = write_matrix(str(tmp_path), 2)
    group = zarr.open_group(tmp_path / "pefs" / art, mode="r+", use_consolidated=False)
    group.attrs["curvlake:schema_version"] = "1.7"
    zarr.consolidate_metadata(group.store)
    assert lake.open(art)["dense"].shape == (2 * ROWS_PER_BLOCK, 6)


def test_gc_removes_stale_staging_only(tmp_path):
    lake = open_lake(tmp_path, create=True)
    art, _ = write_matrix(str(tmp_path), 2)
    process = _spawn_writer(tmp_path, 9, delay=0.2)
    process.stdout.readline()
    process.send_signal(signal.SIGKILL)
    process.wait()
    (tmp_path / "pefs" / art / "debris.abc.partial").write_text("x")
    removed = lake.gc()
    assert any("_staging" in p for p in removed) and any(p.endswith(".partial") for p in removed)
    assert [i.id for i in lake.list()] == [art]
    lake.validate(art)


def test_gc_keeps_staging_of_live_writer(tmp_path):
    lake = open_lake(tmp_path, create=True)
    process = _spawn_writer(tmp_path, 50, delay=0.2)
    process.stdout.readline()
    try:
        assert lake.gc() == []
    finally:
        process.kill()
        process.wait()
    time.sleep(0.1)
    assert len(lake.gc()) == 1


def test_memory_url_lake():
    """fsspec URLs work: no rename there, the status attribute is the commit marker."""
    url = f"memory://lake-{os.getpid()}"
    lake = open_lake(url, create=True)
    writer = lake.begin("dataset", {"name": "m"})
    writer.write("x", np.ones((3, 2), np.float32))
    writer.write("y", np.arange(3))
    writer.write("split", np.array(["train"] * 3, dtype=object))
    writer.write("sample_id", np.arange(3))
    with pytest.raises(IncompleteArtifactError):
        lake.open(writer.id)
    writer.set_attrs(input_shape=[2], num_classes=3, name="m")
    writer.commit()
    np.testing.assert_array_equal(lake.open(writer.id)["y"].values, np.arange(3))
    assert [i.status for i in lake.list()] == ["complete"]


def test_error_while_writing_marks_failed_and_keeps_staging(tmp_path):
    lake = open_lake(tmp_path, create=True)
    writer = lake.begin("dataset", {"will": "fail"})
    with pytest.raises(RuntimeError, match="boom"), writer:
        writer.write("y", np.arange(3))
        raise RuntimeError("boom")
    info = lake.info(writer.id)
    assert info.status == "failed"
    with pytest.raises(IncompleteArtifactError, match="status: failed"):
        lake.open(writer.id)
    resumed = lake.begin("dataset", {"will": "fail"})  # a rerun picks the staging up again
    assert resumed.resumed and "y" in resumed.group.array_keys()


def test_write_regions_writes_every_region_of_a_work_group(tmp_path):
    group = zarr.open_group(tmp_path / "work", mode="w")
    rows = create_work_array(group, "rows", (3, 4), "float64", chunks=(1, 4))
    flags = create_work_array(group, "flags", (3,), "int64", chunks=(1,))
    rows[:] = 0.0
    flags[:] = 0
    write_regions([(rows, 1, np.arange(4.0)), (flags, slice(0, 2), [5, 6])])
    np.testing.assert_array_equal(rows[:], [[0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(flags[:], [5, 6, 0])
    write_regions([])  # nothing to write is no error
