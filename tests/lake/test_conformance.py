"""One conformance suite that every artifact kind passes (zarr-python's StoreTests pattern).

For each kind, its spec's tiny example is written block by block, validated, reopened, refused
while incomplete, resumed after an interruption, and found damaged when one of its chunk files
is deleted, truncated or has a bit flipped.
"""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from curvlake.errors import CorruptChunkError, IncompleteArtifactError, SchemaError
from curvlake.lake import open_lake
from curvlake.storage_schema import SPECS


def _write(writer, arrays, attrs, stop_after=None):
    """Write every array in two row blocks, marking progress; stop after ``stop_after`` blocks."""
    names = sorted(arrays)
    progress = writer.progress("blocks", 2 * len(names))
    written = 0
    for block in progress.pending():
        name = names[block // 2]
        data = np.asarray(arrays[name])
        array = writer.create_array(
            name, data.shape, None if data.dtype.kind in "OUT" else data.dtype
        )
        half = (data.shape[0] + 1) // 2
        rows = slice(0, half) if block % 2 == 0 else slice(half, None)
        array[rows] = data[rows]
        progress.mark_done(block)
        written += 1
        if stop_after is not None and written >= stop_after:
            return written
    writer.set_attrs(**attrs)
    writer.commit()
    return written


def _assert_equal(dataset, arrays):
    for name, expected in arrays.items():
        got = dataset[name].values
        if np.asarray(expected).dtype.kind in "OUT":
            assert [str(v) for v in got] == [str(v) for v in expected]
        else:
            np.testing.assert_array_equal(got, expected)


@pytest.fixture(params=sorted(SPECS))
def kind(request):
    return request.param


def test_write_validate_reopen(tmp_path, kind):
    lake = open_lake(tmp_path / "lake", create=True)
    arrays, attrs = SPECS[kind].example()
    writer = lake.begin(kind, {"case": "conformance"})
    _write(writer, arrays, attrs)
    lake.validate(writer.id)
    _assert_equal(lake.open(writer.id), arrays)
    _assert_equal(xr.open_zarr(tmp_path / "lake" / kind / writer.id), arrays)
    assert lake.info(writer.id).status == "complete"
    assert lake.begin(kind, {"case": "conformance"}).complete  # same config -> reused


def test_refuse_incomplete_then_resume(tmp_path, kind):
    lake = open_lake(tmp_path / "lake", create=True)
    arrays, attrs = SPECS[kind].example()
    writer = lake.begin(kind, {"case": "resume"})
    stop = min(3, 2 * len(arrays) - 1)  # interrupt before the last block
    _write(writer, arrays, attrs, stop_after=stop)
    lake._release(writer.id)  # as if the writing process had died
    with pytest.raises(IncompleteArtifactError, match=writer.id):
        lake.open(writer.id)
    assert [i.status for i in lake.list(kind)] == ["writing"]

    resumed = lake.begin(kind, {"case": "resume"})
    assert resumed.resumed and resumed.id == writer.id
    written = _write(resumed, arrays, attrs)
    assert written == 2 * len(arrays) - stop  # only the missing blocks
    _assert_equal(lake.open(writer.id), arrays)


def test_missing_array_fails_validation(tmp_path, kind):
    lake = open_lake(tmp_path / "lake", create=True)
    arrays, attrs = SPECS[kind].example()
    required = next(a.name for a in SPECS[kind].arrays if a.required and a.variants is None)
    writer = lake.begin(kind, {"case": "missing"})
    arrays.pop(required)
    with pytest.raises(SchemaError, match=f"missing array '{required}'"):
        _write(writer, arrays, attrs)
    with pytest.raises(IncompleteArtifactError):
        lake.open(writer.id)


def _damage(chunk: Path, damage: str) -> None:
    raw = bytearray(chunk.read_bytes())
    if damage == "delete":
        chunk.unlink()
    elif damage == "truncate":
        chunk.write_bytes(bytes(raw[: max(4, len(raw) // 2)]))
    else:
        raw[len(raw) // 2] ^= 0x04
        chunk.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_chunk_is_detected(tmp_path, kind, damage):
    """Every stored array of every kind: a damaged chunk fails validation and every read."""
    lake = open_lake(tmp_path / "lake", create=True)
    arrays, attrs = SPECS[kind].example()
    writer = lake.begin(kind, {"case": "damage"})
    _write(writer, arrays, attrs)
    root = tmp_path / "lake" / kind / writer.id
    for name, array in lake.group(writer.id).arrays():
        if not array.size:
            continue
        chunk = sorted((root / name / "c").rglob("*"), key=lambda p: (p.is_dir(), str(p)))[0]
        original = chunk.read_bytes()
        _damage(chunk, damage)
        named = f"artifact {writer.id}: .*array '{name}'"
        with pytest.raises(CorruptChunkError, match=named):
            lake.validate(writer.id)
        with pytest.raises(CorruptChunkError, match=named):
            lake.open(writer.id)[name].load()
        with pytest.raises(CorruptChunkError, match=named):
            lake.group(writer.id)[name][...]
        chunk.write_bytes(original)
    lake.validate(writer.id)
