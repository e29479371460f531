"""Every way a load can fail gives its own exception class and a message naming what is wrong."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron_core.dist_checkpointing.metadata import read_metadata
from tests.dist_checkpointing.helpers import flip_byte, inner_chunk_byte_ranges


def _st(key, t, *offsets, **kw):
    return ShardedTensor.from_rank_offsets(key, t, *offsets, **kw)


@pytest.fixture
def ckpt(tmp_path):
    """A small committed checkpoint: 'a' [4, 3] fp32, 'big' [4096, 512] fp32 in 2 shards, 'obj'."""
    torch.manual_seed(1)
    big = torch.randn(4096, 512)
    state = {"a": _st("a", torch.randn(4, 3)), "big": [_st("big", c, (0, r, 2)) for r, c in enumerate(big.chunk(2))],
             "obj": ShardedObject("obj", {"x": 1})}
    dc.save(state, tmp_path / "ckpt")
    return tmp_path / "ckpt", state


def _request(**over):
    req = {"a": _st("a", torch.empty(4, 3)), "big": _st("big", torch.empty(4096, 512)), "obj": ShardedObject("obj", None)}
    req.update(over)
    return {k: v for k, v in req.items() if v is not None}


def test_missing_directory(tmp_path):
    with pytest.raises(dc.CheckpointNotFoundError, match=r"nope.*does not exist"):
        dc.load(_request(), tmp_path / "nope")


def test_missing_metadata_is_an_incomplete_checkpoint(ckpt):
    path, _ = ckpt
    (path / "metadata.json").unlink()
    with pytest.raises(dc.IncompleteCheckpointError, match="no metadata.json: it is an incomplete checkpoint"):
        dc.load(_request(), path)


def test_newer_format_version_is_refused(ckpt):
    path, _ = ckpt
    raw = json.loads((path / "metadata.json").read_text())
    raw["version"] = dc.FORMAT_VERSION + 1
    raw["some_future_field"] = {"x": 1}
    (path / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(dc.UnsupportedFormatVersionError,
                       match=f"format version {dc.FORMAT_VERSION + 1}, but this reader supports versions up to "
                             f"{dc.FORMAT_VERSION}. Upgrade"):
        dc.load(_request(), path)


def test_foreign_metadata_is_refused(ckpt):
    path, _ = ckpt
    (path / "metadata.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(dc.CheckpointFormatError, match="'something-else' is not"):
        dc.load(_request(), path)


def test_missing_key(ckpt):
    path, _ = ckpt
    with pytest.raises(dc.MissingKeyError, match=r"1 missing keys.*\n  c$") as info:
        dc.load(_request(c=_st("c", torch.empty(2))), path)
    assert info.value.missing_keys == ["c"] and info.value.unexpected_keys == []


def test_unexpected_key(ckpt):
    path, _ = ckpt
    with pytest.raises(dc.UnexpectedKeyError, match=r"1 unexpected keys .*\n  a$") as info:
        dc.load(_request(a=None), path)
    assert info.value.unexpected_keys == ["a"]
    out = dc.load(_request(a=None), path, strict="raise_missing")  # a partial load on purpose
    assert set(out) == {"big", "obj"}


def test_shape_mismatch_names_key_both_shapes_and_path(ckpt):
    path, _ = ckpt
    with pytest.raises(dc.ShapeMismatchError) as info:
        dc.load(_request(a=_st("a", torch.empty(4, 5))), path)
    assert f"a: model expects global shape (4, 5), checkpoint {str(path)!r} holds (4, 3)" in str(info.value)


def test_dtype_mismatch_names_both_dtypes(ckpt):
    path, _ = ckpt
    with pytest.raises(dc.DTypeMismatchError, match="a: model expects dtype bfloat16, checkpoint holds float32"):
        dc.load(_request(a=_st("a", torch.empty(4, 3, dtype=torch.bfloat16))), path)


def test_one_error_lists_every_problem(ckpt):
    path, _ = ckpt
    req = _request(a=None, big=_st("big", torch.empty(4096, 256, dtype=torch.float16)), c=_st("c", torch.empty(1)),
                   d=ShardedObject("d", None))
    with pytest.raises(dc.CheckpointMismatchError) as info:
        dc.load(req, path)
    err = info.value
    assert type(err) is dc.CheckpointMismatchError
    assert err.missing_keys == ["c", "d (object)"] and err.unexpected_keys == ["a"]
    assert len(err.shape_mismatches) == 1 and len(err.dtype_mismatches) == 1
    for part in ("2 missing keys", "1 unexpected keys", "1 shape mismatches", "1 dtype mismatches",
                 "(4096, 256)", "(4096, 512)", "float16"):
        assert part in str(err)


def test_strict_warn_and_ignore_keep_the_given_value(ckpt, caplog):
    path, _ = ckpt
    given = torch.full((2,), 9.0)
    with caplog.at_level(logging.WARNING):
        out = dc.load(_request(a=None, c=_st("c", given)), path, strict="warn")
    assert torch.equal(out["c"], given) and "1 missing keys ['c'], 1 unexpected keys ['a']" in caplog.text
    out = dc.load(_request(a=None, c=_st("c", given)), path, strict="ignore")
    assert torch.equal(out["c"], given)
    with pytest.raises(dc.ShapeMismatchError):  # never tolerated
        dc.load(_request(a=_st("a", torch.empty(1))), path, strict="ignore")


def test_flipped_byte_fails_the_load_naming_the_key(ckpt):
    path, state = ckpt
    rec = read_metadata(path).tensors["big"]
    assert rec.inner_chunk_shape == (512, 512)  # 4 inner chunks per saved shard
    chunk = path / "big" / "c.1.0"
    offset, _ = inner_chunk_byte_ranges(chunk, 4)[2]  # global rows 3072:3584
    flip_byte(chunk, offset + 100)
    damaged = r"big: reading .*big.* failed: .*([Dd]igest mismatch|inner chunk 2 failed its crc32c)"
    with pytest.raises(dc.CorruptedCheckpointError, match=damaged):
        dc.load(_request(), path)
    # partial reads: one touching the damaged inner chunk fails, one beside it succeeds
    with pytest.raises(dc.CorruptedCheckpointError, match="big"):
        dc.load({"big": _st("big", torch.empty(512, 512), (0, 6, 8))}, path, strict="ignore")
    out = dc.load({"big": _st("big", torch.empty(512, 512), (0, 5, 8))}, path, strict="ignore")
    assert torch.equal(out["big"], state["big"][1].data[512:1024])


def test_flipped_byte_in_the_chunk_index_fails_too(ckpt):
    path, _ = ckpt
    chunk = path / "big" / "c.0.0"
    flip_byte(chunk, chunk.stat().st_size - 10)  # inside the index (offsets/sizes + crc32c at the end)
    with pytest.raises(dc.CorruptedCheckpointError, match="big"):
        dc.load(_request(), path)


def test_small_unsharded_chunk_is_checksummed_too(ckpt):
    path, _ = ckpt
    flip_byte(path / "a" / "c.0.0", 5)
    with pytest.raises(dc.CorruptedCheckpointError, match="a: reading"):
        dc.load(_request(), path)


def test_missing_or_truncated_chunk_file(ckpt):
    path, _ = ckpt
    chunk = path / "big" / "c.1.0"
    data = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(dc.MissingChunkError, match=r"big: chunk file .*c\.1\.0.* is missing"):
        dc.load(_request(), path)
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(dc.CorruptedCheckpointError, match="big"):
        dc.load(_request(), path)


def test_missing_object_file(ckpt):
    path, _ = ckpt
    (path / "objects" / "obj" / "shard_0.pt").unlink()
    with pytest.raises(dc.MissingChunkError, match="obj: file .*shard_0.pt.* is missing"):
        dc.load(_request(), path)
