"""The direct chunk reader returns exactly what zarr's decode path returns, or falls back."""

import mmap

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from curvlake.errors import CorruptChunkError
from curvlake.lake import _chunks as chunks_module
from curvlake.lake._chunks import GuardedChunks, RawChunkReader, dask_array


def _array(tmp_path, data, chunks, fill_value=None):
    group = zarr.open_group(tmp_path / "g.zarr", mode="a", zarr_format=3)
    array = group.create_array(
        "x",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        compressors=(Crc32cCodec(),),
        fill_value=fill_value,
    )
    return array


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.int64, np.int8, np.uint16, np.bool_, np.float16]
)
@pytest.mark.parametrize(
    ("shape", "chunks"), [((10, 7), (4, 3)), ((8, 6), (4, 6)), ((5,), (2,)), ((3, 4, 5), (2, 4, 2))]
)
def test_raw_reads_equal_zarr_reads(tmp_path, dtype, shape, chunks):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(shape) * 50).astype(dtype)
    array = _array(tmp_path, data, chunks)
    array[...] = data
    reader = RawChunkReader.for_array(array)
    assert reader is not None
    result = dask_array(array, "art", "x").compute(scheduler="sync")
    np.testing.assert_array_equal(result, data)
    assert result.dtype == data.dtype
    guarded = GuardedChunks(array, "art", "x")
    for coords in np.ndindex(*array.cdata_shape):
        key = tuple(
            slice(c * k, min((c + 1) * k, s)) for c, k, s in zip(coords, chunks, shape, strict=True)
        )
        assert reader.chunk_coords(key) == coords
        direct = guarded[key]
        np.testing.assert_array_equal(direct, array[key])
        assert direct.shape == array[key].shape and direct.flags.c_contiguous
    # Chunks are mapped copy-on-write: writable, and writing never reaches the file.
    chunk = guarded[tuple(slice(0, k) for k in chunks)]
    chunk[...] = 0
    np.testing.assert_array_equal(array[...], data)


def test_mapped_large_chunks_equal_zarr_and_stay_private(tmp_path, monkeypatch):
    data = np.random.default_rng(1).standard_normal((700, 300)).astype(np.float32)
    array = _array(tmp_path, data, (512, 300))  # 600 KiB chunks
    array[...] = data
    for limit in (1 << 20, 1):  # read into a buffer, then mapped
        monkeypatch.setattr(chunks_module, "MAP_MIN_BYTES", limit)
        reader = RawChunkReader.for_array(array)
        first, edge = reader.read((0, 0)), reader.read((1, 0))
        np.testing.assert_array_equal(first, data[:512])
        np.testing.assert_array_equal(edge, data[512:])
        assert first.flags.writeable and first.flags.c_contiguous
        assert isinstance(_memory_owner(first), mmap.mmap) == (limit == 1)
        first[...] = 0
        np.testing.assert_array_equal(array[:512], data[:512])


def _memory_owner(array: np.ndarray):
    owner = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner.obj if isinstance(owner, memoryview) else owner


@pytest.mark.parametrize("mapped", [False, True])
def test_missing_chunks_raise_unless_sparse(tmp_path, monkeypatch, mapped):
    monkeypatch.setattr(chunks_module, "MAP_MIN_BYTES", 1 if mapped else 1 << 20)
    data = np.zeros((6, 4), np.float32)
    array = _array(tmp_path, data, (2, 4), fill_value=np.float32(np.nan))
    array[2:4] = 7.0  # chunks c/0/0 and c/2/0 are never written
    whole, partial = (slice(0, 2), slice(0, 4)), (slice(1, 3), slice(0, 4))
    for key in (whole, partial):  # the direct path, then zarr's
        with pytest.raises(
            CorruptChunkError, match="artifact a: array 'x': chunk c/0/0 is missing"
        ):
            GuardedChunks(array, "a", "x")[key]
    with pytest.raises(CorruptChunkError, match=r"chunk c/[02]/0 is missing"):
        dask_array(array, "a", "x").compute()
    sparse = GuardedChunks(array, "a", "x", sparse=True)
    np.testing.assert_array_equal(sparse[whole], np.full((2, 4), np.nan, np.float32))
    np.testing.assert_array_equal(sparse[2:4, 0:4], np.full((2, 4), 7.0, np.float32))
    np.testing.assert_array_equal(dask_array(array, "a", "x", sparse=True).compute(), array[...])


def test_partial_selections_and_other_codecs_go_through_zarr(tmp_path):
    data = np.arange(40, dtype=np.float64).reshape(10, 4)
    array = _array(tmp_path, data, (4, 4))
    array[...] = data
    reader = RawChunkReader.for_array(array)
    assert reader.chunk_coords((slice(0, 3), slice(0, 4))) is None
    assert reader.chunk_coords((slice(4, 8), slice(0, 4), 1)) is None
    assert reader.chunk_coords((slice(0, 4, 2), slice(0, 4))) is None
    assert reader.chunk_coords((slice(8, 10), slice(0, 4))) == (2, 0)
    np.testing.assert_array_equal(GuardedChunks(array, "a", "x")[1:7, 1:3], data[1:7, 1:3])
    compressed = zarr.open_group(tmp_path / "c.zarr", mode="w").create_array(
        "x", shape=(4,), dtype=np.float32, chunks=(2,), compressors=(ZstdCodec(), Crc32cCodec())
    )
    assert RawChunkReader.for_array(compressed) is None
    strings = zarr.open_group(tmp_path / "s.zarr", mode="w").create_array(
        "x", shape=(4,), dtype=str, chunks=(2,)
    )
    assert RawChunkReader.for_array(strings) is None


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_damaged_chunk_raises_naming_artifact_and_array(tmp_path, monkeypatch, damage, mapped):
    monkeypatch.setattr(chunks_module, "MAP_MIN_BYTES", 1 if mapped else 1 << 20)
    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    array = _array(tmp_path, data, (2, 4))
    array[...] = data
    chunk = tmp_path / "g.zarr" / "x" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    if damage == "flip":
        raw[5] ^= 0x10
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw += b"\0"
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match="artifact art: array 'x'"):
        dask_array(array, "art", "x").compute(scheduler="sync")
    np.testing.assert_array_equal(GuardedChunks(array, "art", "x")[0:2, 0:4], data[0:2])
