"""Integrity: every chunk of a complete artifact is stored and checked; damaged ones are removed.

A missing chunk is corruption, never the fill value: readers (the mapped path and zarr's, local
and fsspec stores) raise CorruptChunkError naming artifact, array and chunk; ``validate`` and
``begin`` find it from a listing; ``commit`` refuses an array with unwritten chunks; and
``remove`` / ``curvlake lake rm`` take a damaged artifact (and what was computed from it) away.
"""

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.errors import ArtifactNotFoundError, CorruptChunkError, LakeError
from curvlake.lake import open_lake
from curvlake.lake._chunks import RawChunkReader
from curvlake.nn.models import build_model
from curvlake.pipelines.runs import export_state_dict, import_run
from curvlake.storage_schema import SPECS

DATASET_ATTRS = {"input_shape": [2], "num_classes": 3, "name": "d"}


def _dataset(lake, config, inputs=(), x=None, compress_y=False):
    """A complete 6-example dataset artifact, every array in chunks of 2 rows."""
    writer = lake.begin("dataset", config, inputs=inputs)
    xs = np.arange(12, dtype=np.float32).reshape(6, 2) if x is None else x
    writer.create_array("x", xs.shape, "float32", chunks=(2, 2))[...] = xs
    writer.create_array("y", (6,), "int64", chunks=(2,), compress=compress_y)[...] = np.arange(6)
    split = np.array(["train", "test"] * 3, dtype=object)
    writer.create_array("split", (6,), chunks=(2,))[...] = split
    writer.write("sample_id", np.arange(6))
    writer.set_attrs(**DATASET_ATTRS)
    return writer.commit()


def _chunk(root, artifact, name, key="c/1"):
    return root / "dataset" / artifact / name / key


@pytest.fixture
def lake(tmp_path):
    return open_lake(tmp_path / "lake", create=True)


@pytest.mark.parametrize(
    ("name", "key", "selection"),
    [
        ("x", "c/1/0", (slice(2, 4), slice(0, 2))),  # raw: the mapped path
        ("x", "c/1/0", (slice(1, 5), slice(0, 1))),  # raw, partial: zarr's path
        ("y", "c/1", (slice(None),)),  # compressed
        ("split", "c/1", (slice(None),)),  # strings
    ],
)
def test_missing_chunk_read_raises(lake, name, key, selection):
    art = _dataset(lake, {"case": "missing"}, compress_y=True)
    assert RawChunkReader.for_array(lake.group(art)["x"]) is not None  # lake reads are mapped
    os.remove(_chunk(Path(lake.root), art, name, key))
    message = f"artifact {art}: array '{name}': chunk {key} is missing"
    with pytest.raises(CorruptChunkError, match=message):
        lake.open(art)[name].load()
    with pytest.raises(CorruptChunkError, match=message):
        lake.open(art)[name][selection].load()
    with pytest.raises(CorruptChunkError, match=message):
        lake.group(art)[name][selection]
    with pytest.raises(CorruptChunkError, match=f"curvlake lake rm {art}"):
        lake.group(art)[name][...]
    np.testing.assert_array_equal(lake.group(art)["sample_id"][:], np.arange(6))


def test_missing_chunk_on_an_fsspec_store_raises():
    url = f"memory://integrity-{os.getpid()}"
    lake = open_lake(url, create=True)
    art = _dataset(lake, {"case": "memory"})
    lake.fs.rm(f"{lake.root}/dataset/{art}/x/c/2/0")
    with pytest.raises(CorruptChunkError, match=f"artifact {art}: array 'x': chunk c/2/0"):
        lake.open(art)["x"].load()
    with pytest.raises(CorruptChunkError, match="chunk c/2/0 is missing"):
        lake.group(art)["x"][4:6]
    with pytest.raises(CorruptChunkError, match=r"'x': 1 of 3 chunk\(s\) missing \(c/2/0\)"):
        lake.validate(art, check_chunks=False)
    assert lake.remove(art) == [art] and lake.list() == []


def test_validate_reports_missing_and_resized_chunks(lake):
    art = _dataset(lake, {"case": "validate"})
    lake.validate(art)
    os.remove(_chunk(Path(lake.root), art, "x", "c/1/0"))
    for check_chunks in (True, False):
        with pytest.raises(CorruptChunkError, match=r"array 'x': 1 of 3 chunk\(s\) missing"):
            lake.validate(art, check_chunks=check_chunks)
    os.remove(_chunk(Path(lake.root), art, "split", "c/0"))
    with pytest.raises(CorruptChunkError) as both:
        lake.validate(art, check_chunks=False)
    assert "array 'x': 1 of 3 chunk(s) missing (c/1/0)" in str(both.value)
    assert "array 'split': 1 of 3 chunk(s) missing (c/0)" in str(both.value)

    other = _dataset(lake, {"case": "resized"})
    chunk = _chunk(Path(lake.root), other, "x", "c/2/0")
    chunk.write_bytes(chunk.read_bytes() + b"\0")  # a raw chunk's size is known: no read needed
    with pytest.raises(CorruptChunkError, match="array 'x': chunk c/2/0 has the wrong size"):
        lake.validate(other, check_chunks=False)


def test_commit_refuses_a_skipped_chunk(lake):
    writer = lake.begin("dataset", {"case": "skipped"})
    x = writer.create_array("x", (6, 2), "float32", chunks=(2, 2))
    x[0:2], x[4:6] = 1.0, 2.0  # the task owning rows 2:4 never ran
    writer.write("y", np.arange(6))
    writer.write("split", np.array(["train"] * 6, dtype=object))
    writer.write("sample_id", np.arange(6))
    writer.set_attrs(**DATASET_ATTRS)
    with pytest.raises(LakeError, match=r"cannot commit.*array 'x': 1 of 3 chunk\(s\).*c/1/0"):
        writer.commit()
    assert lake.info(writer.id).status == "writing"


def test_all_fill_chunks_are_written(lake):
    writer = lake.begin("dataset", {"case": "fill"})
    x = writer.create_array("x", (4, 2), "float32", chunks=(2, 2))  # fill value NaN
    x[0:2] = np.nan
    lake._release(writer.id)
    resumed = lake.begin("dataset", {"case": "fill"})  # arrays found again write fill too
    resumed.create_array("x", (4, 2), "float32", chunks=(2, 2))[2:4] = np.nan
    resumed.write("y", np.zeros(4, np.int64))  # fill value 0
    resumed.write_many(
        {"split": np.array([""] * 4, dtype=object), "sample_id": np.zeros(4, np.int64)}
    )
    progress = resumed.progress("blocks", 2)
    progress.mark_done(0)
    progress.mark_done(1)
    resumed.set_attrs(**DATASET_ATTRS)
    art = resumed.commit()
    lake.validate(art)
    assert np.isnan(lake.open(art)["x"].values).all()
    assert (lake.open(art)["y"].values == 0).all()


def test_sparse_arrays_may_lack_chunks(lake, monkeypatch):
    spec = SPECS["dataset"]
    arrays = tuple(dataclasses.replace(a, sparse=a.name == "x") for a in spec.arrays)
    monkeypatch.setitem(SPECS, "dataset", dataclasses.replace(spec, arrays=arrays))
    writer = lake.begin("dataset", {"case": "sparse"})
    writer.create_array("x", (6, 2), "float32", chunks=(2, 2))[2:4] = 1.0
    writer.write("y", np.arange(6))
    writer.write("split", np.array(["train"] * 6, dtype=object))
    writer.write("sample_id", np.arange(6))
    writer.set_attrs(**DATASET_ATTRS)
    art = writer.commit()
    lake.validate(art)
    x = lake.open(art)["x"].values
    assert np.isnan(x[:2]).all() and (x[2:4] == 1).all()
    assert np.isnan(lake.group(art)["x"][4:6]).all()


def _chain(lake):
    """a <- b <- c (each the input of the next) and d, unrelated."""
    a = _dataset(lake, {"case": "a"})
    b = _dataset(lake, {"case": "b"}, inputs=[a])
    c = _dataset(lake, {"case": "c"}, inputs=[b, a])
    d = _dataset(lake, {"case": "d"})
    return a, b, c, d


def test_remove_with_and_without_dependents(lake):
    a, b, c, d = _chain(lake)
    with pytest.raises(LakeError, match=f"artifact {a} is an input of {c}, {b}; .*--recursive"):
        lake.remove(a)
    assert lake.remove(a, recursive=True, dry_run=True) == [c, b, a]
    assert len(lake.list()) == 4
    assert lake.remove(c) == [c]
    assert lake.remove(a, recursive=True) == [b, a]
    assert [i.id for i in lake.list()] == [d]
    assert not (Path(lake.root) / "dataset" / a).exists()
    with pytest.raises(ArtifactNotFoundError, match=a):
        lake.remove(a)


def test_remove_a_staged_artifact(lake):
    writer = lake.begin("dataset", {"case": "staged"})
    writer.write("y", np.arange(3))
    _other_process_holds(lake, writer.id)
    with pytest.raises(LakeError, match="being written by process 1 on"):
        lake.remove(writer.id)
    lake._release(writer.id)
    assert lake.remove(writer.id) == [writer.id]
    assert lake.list() == [] and not (Path(lake.root) / "_staging" / writer.id).exists()
    assert not lake.begin("dataset", {"case": "staged"}).resumed


def _other_process_holds(lake, artifact):
    """Make the lock of ``artifact`` name a live process other than this one (pid 1)."""
    holder = {"host": socket.gethostname(), "pid": 1}
    (Path(lake.root) / "_staging" / f"{artifact}.lock").write_text(json.dumps(holder))


def test_begin_on_a_damaged_artifact_says_how_to_recover(lake):
    config = {"case": "a"}
    a = _dataset(lake, config)
    os.remove(_chunk(Path(lake.root), a, "y"))
    hint = f"remove it with `curvlake lake rm {a}` and rerun"
    with pytest.raises(LakeError, match=rf"artifact {a} is stored but damaged \(.*'y'.*\); {hint}"):
        lake.begin("dataset", config)
    with pytest.raises(LakeError, match=f"input artifact {a} is stored but damaged"):
        lake.begin("dataset", {"case": "b"}, inputs=[a])
    lake.remove(a)
    assert _dataset(lake, config) == a  # recomputed
    lake.validate(a)


def _cli(lake, *args, input=None):
    return CliRunner().invoke(cli, ["--lake", str(Path(lake.root)), "lake", *args], input=input)


def test_cli_validate_an_empty_lake(lake):
    result = _cli(lake, "validate")
    assert result.exit_code == 0 and "no complete artifacts to validate" in result.output


def test_cli_validate_reports_a_missing_chunk(lake):
    art = _dataset(lake, {"case": "a"})
    os.remove(_chunk(Path(lake.root), art, "x", "c/0/0"))
    for flags in ((), ("--no-chunks",)):
        result = _cli(lake, "validate", *flags)
        assert result.exit_code == 1
        assert f"FAILED  artifact {art}: array 'x': 1 of 3 chunk(s) missing" in result.output


def test_cli_rm(lake):
    a, b, c, d = _chain(lake)
    result = _cli(lake, "rm", a, "--yes")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"Error: artifact {a} is an input of {c}, {b}; remove them too with "
        f"`curvlake lake rm {a} --recursive`"
    ]
    assert _cli(lake, "rm", d, input="n\n").exit_code == 1  # not confirmed: kept
    assert d in [i.id for i in lake.list()]
    result = _cli(lake, "rm", a, "--recursive", input="y\n")
    assert result.exit_code == 0
    assert result.output.splitlines()[-3:] == [f"removed {c}", f"removed {b}", f"removed {a}"]
    assert _cli(lake, "rm", "-y", d).output == f"removed {d}\n"
    assert "the lake is empty" in _cli(lake, "ls").output


def test_a_model_with_a_missing_theta_chunk_is_not_exported(lake, tmp_path):
    """The issue's case: `runs export` used to write a model of NaN parameters."""
    net = build_model("cnn5_k", num_classes=10, input_shape=(1, 8, 8), k=2)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    run_id = import_run(
        lake,
        tmp_path / "weights.pt",
        model="cnn5_k",
        model_params={"k": 2},
        num_classes=10,
        input_shape=(1, 8, 8),
    )
    os.remove(Path(lake.root) / "run" / run_id / "theta" / "c" / "0" / "0")
    with pytest.raises(CorruptChunkError, match=f"artifact {run_id}: array 'theta': chunk c/0/0"):
        export_state_dict(lake, run_id, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_legacy_artifacts_read_absent_chunks_as_fill_values(lake):
    """Artifacts written before every chunk was stored (no ``curvlake:all_chunks``) keep
    opening: their writer skipped fill-valued chunks, so an absent chunk is the fill value."""
    nan = np.full((6, 2), np.nan, np.float32)  # floats' fill value
    art = _dataset(lake, {"legacy": True}, x=nan)
    root = Path(lake.url)
    meta_path = root / "dataset" / art / "zarr.json"
    meta = json.loads(meta_path.read_text())
    assert meta["attributes"].pop("curvlake:all_chunks") is True  # new artifacts carry it
    meta_path.write_text(json.dumps(meta))
    for key in ("c/0/0", "c/1/0"):  # as an old writer left fill-valued chunks: not stored
        _chunk(root, art, "x", key).unlink()
    np.testing.assert_array_equal(lake.open(art)["x"].values, nan)
    lake.validate(art)
    assert lake.begin("dataset", {"legacy": True}).complete  # reused, not refused
