"""Save/load in one process: round trips, resharding, layout on disk, overwrite, objects, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron_core.dist_checkpointing.metadata import read_metadata
from tests.dist_checkpointing.helpers import (
    assert_bit_exact,
    expected_local,
    flat_loaded,
    flip_byte,
    full_state,
    sharded,
)


def _all_ranks(full, world, empty=False):
    """Every rank's sharded state dict in one tree: one process saving what ``world`` ranks would."""
    return [sharded(full, r, world, empty=empty) for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("saved", "loaded"), [(1, 1), (1, 4), (4, 1), (2, 4), (4, 2)])
def test_reshard_round_trip_is_bit_exact(tmp_path, dtype, saved, loaded):
    full = full_state(seed=saved * 10 + loaded, dtype=dtype)
    dc.save(_all_ranks(full, saved), tmp_path / "ckpt", common_state_dict={"iteration": 3})
    request = _all_ranks(full, loaded, empty=True)
    if saved != loaded:  # per-rank objects only load at the same world size: leave them out
        for tree in request:
            del tree["extra"]["rng"]
    out = dc.load(request, tmp_path / "ckpt", strict="raise" if saved == loaded else "raise_missing")
    for rank in range(loaded):
        assert_bit_exact(flat_loaded(out[rank]), expected_local(full, rank, loaded))
        assert out[rank]["extra"]["config"] == {"layers": 2, "name": "tiny"}
    if saved == loaded:  # per-rank objects come back to the same rank
        assert [o["extra"]["rng"]["rank"] for o in out] == list(range(loaded))
    assert dc.load_common_state_dict(tmp_path / "ckpt") == {"iteration": 3}


def test_layout_on_disk_one_chunk_file_per_saving_shard(tmp_path):
    full = full_state()
    dc.save(_all_ranks(full, 4), tmp_path / "ckpt")
    meta = read_metadata(tmp_path / "ckpt")
    assert meta.format == dc.FORMAT_NAME and meta.version == dc.FORMAT_VERSION
    col = meta.tensors["col"]
    assert col.chunk_shape == (4, 6) and [s.offset for s in col.shards] == [(0, 0), (4, 0), (8, 0), (12, 0)]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "col").iterdir()) == ["c.0.0", "c.1.0", "c.2.0", "c.3.0",
                                                                            "zarr.json"]
    assert meta.tensors["grid"].chunk_shape == (4, 4, 3)
    assert len(meta.tensors["norm"].shards) == 1  # replicated: only the main replica was written
    assert len(meta.tensors["fc1"].shards) == 8  # swiglu factory: gate and up fragments per rank
    assert meta.tensors["mask"].dtype == "bool" and meta.tensors["ids"].dtype == "int32"
    assert (tmp_path / "ckpt" / "col" / "zarr.json").is_file()  # a plain zarr3 array
    assert not list(tmp_path.glob("ckpt.tmp-*"))
    tensors = dc.load_tensors_metadata(tmp_path / "ckpt")
    assert tensors["col"].global_shape == (16, 6) and tensors["col"].axis_fragmentations == (4, 1)
    plain = dc.load_plain_tensors(tmp_path / "ckpt")
    assert torch.equal(plain["fc1"], full["fc1"]) and torch.equal(plain["grid"], full["grid"])


def test_inner_chunks_make_a_resharding_read_touch_only_what_it_needs(tmp_path):
    # [2048, 512] fp32 saved at "TP=2" on axis 0: each 2 MiB shard is cut into <= 1 MiB inner chunks
    w = torch.randn(2048, 512)
    dc.save([ShardedTensor.from_rank_offsets("w", c, (0, r, 2)) for r, c in enumerate(torch.chunk(w, 2))],
            tmp_path / "ckpt")
    rec = read_metadata(tmp_path / "ckpt").tensors["w"]
    assert rec.chunk_shape == (1024, 512) and rec.inner_chunk_shape == (512, 512)
    # a TP=4 rank needs half a saved shard: reading it must not touch the other half -> corrupt it
    n_inner = 2
    from tests.dist_checkpointing.helpers import inner_chunk_byte_ranges
    chunk = tmp_path / "ckpt" / "w" / "c.0.0"
    ranges = inner_chunk_byte_ranges(chunk, n_inner)
    for offset, _ in ranges[n_inner // 2:]:
        flip_byte(chunk, offset + 1)
    out = dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(512, 512), (0, 0, 4))}, tmp_path / "ckpt")
    assert torch.equal(out["w"], w[:512])
    with pytest.raises(dc.CorruptedCheckpointError, match="w"):
        dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(512, 512), (0, 1, 4))}, tmp_path / "ckpt")


def test_all_zero_tensors_are_stored_not_elided(tmp_path):
    # zarr's default skips chunks equal to the fill value; a zero bias must still have its file
    w = torch.zeros(2048, 512)
    w[:512] = 1.0  # first inner chunk non-zero, the others zero
    dc.save({"b": ShardedTensor.from_rank_offsets("b", torch.zeros(8)), "w": ShardedTensor.from_rank_offsets("w", w)},
            tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "b" / "c.0").is_file()
    from tests.dist_checkpointing.helpers import inner_chunk_byte_ranges
    ranges = inner_chunk_byte_ranges(tmp_path / "ckpt" / "w" / "c.0.0", 4)
    assert all(size == 512 * 512 * 4 + 4 for _, size in ranges)  # data + crc32c, nothing elided
    out = dc.load_plain_tensors(tmp_path / "ckpt")
    assert torch.equal(out["b"], torch.zeros(8)) and torch.equal(out["w"], w)


def test_sharded_objects_round_trip_as_plain_values(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random(3)
    state = {
        "plain": ShardedObject("plain", {"a": [1, 2.5, "x"], "t": torch.arange(4)}),
        # NumPy state stored as tensors and plain values (what the Trainer does for its RNG)
        "numpy": ShardedObject("numpy", {"arr": torch.from_numpy(arr), "seed": (3, None, 1.5)}),
        "bytes": ShardedObject("weird/key name", b"\x00\x01raw"),
    }
    dc.save(state, tmp_path / "ckpt")
    meta = read_metadata(tmp_path / "ckpt")
    assert all(s.weights_only and s.crc32c is not None for o in meta.objects.values() for s in o.shards)
    out = dc.load({k: ShardedObject(v.key, None) for k, v in state.items()}, tmp_path / "ckpt")
    assert out["plain"]["a"] == [1, 2.5, "x"] and torch.equal(out["plain"]["t"], torch.arange(4))
    np.testing.assert_array_equal(out["numpy"]["arr"].numpy(), arr)
    assert out["numpy"]["seed"] == (3, None, 1.5)
    assert out["bytes"] == b"\x00\x01raw"


def test_nonsharded_leaves_are_stored_once_and_returned_in_place(tmp_path):
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(3)), "meta": {"iteration": 5, "names": ["a"]}}
    dc.save(state, tmp_path / "ckpt")
    out = dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3)), "meta": {"iteration": 0, "names": []}},
                  tmp_path / "ckpt")
    assert out["meta"] == {"iteration": 5, "names": ["a"]} and torch.equal(out["w"], torch.ones(3))


def test_dtype_cast_on_request_and_shape_mismatch_allowed_for_padded_tensors(tmp_path):
    w = torch.randn(6, 4)
    dc.save({"w": ShardedTensor.from_rank_offsets("w", w)}, tmp_path / "ckpt")
    out = dc.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(6, 4, dtype=torch.bfloat16))},
                  tmp_path / "ckpt", allow_dtype_cast=True)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], w.bfloat16())
    padded = ShardedTensor.from_rank_offsets("w", torch.empty(8, 4), allow_shape_mismatch=True)
    out = dc.load({"w": padded}, tmp_path / "ckpt")
    assert torch.equal(out["w"][:6], w) and torch.equal(out["w"][6:], torch.zeros(2, 4))


def test_overwrite_is_refused_unless_asked_and_keeps_a_valid_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}, target)
    with pytest.raises(dc.CheckpointExistsError, match="overwrite=True"):
        dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4))}, target)
    assert torch.equal(dc.load_plain_tensors(target)["w"], torch.ones(4))
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.full((4,), 2.0))}, target, overwrite=True)
    assert torch.equal(dc.load_plain_tensors(target)["w"], torch.full((4,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # old one and temp dir gone
    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(dc.CheckpointExistsError, match="not a committed checkpoint"):
        dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}, tmp_path / "empty")  # empty dir is fine


def test_bad_tiling_reports_every_gap_and_overlap_and_writes_nothing(tmp_path):
    w = torch.randn(8, 4)
    state = [
        ShardedTensor.from_rank_offsets("w", w[0:2], (0, 0, 4)),
        ShardedTensor.from_rank_offsets("w", w[2:4], (0, 1, 4)),
        ShardedTensor.from_rank_offsets("w", w[2:4], (0, 1, 4)),  # overlap at rows 2:4
        # rows 4:6 missing; rows 6:8 only as a non-main replica -> second gap
        ShardedTensor.from_rank_offsets("w", w[6:8], (0, 3, 4), replica_id=1),
        ShardedTensor.from_rank_offsets("v", torch.ones(3), replica_id=1),  # no main replica at all
    ]
    with pytest.raises(dc.ShardingValidationError) as info:
        dc.save(state, tmp_path / "ckpt")
    msg = str(info.value)
    assert "w: global shape (8, 4): gap [4:8, 0:4]" in msg
    assert "overlap [2:4, 0:4] is written by 2 main replicas" in msg
    assert "v: global shape (3,): gap [0:3]" in msg
    assert list(tmp_path.iterdir()) == []  # neither target nor temp dir


def test_cli_inspect_and_verify(tmp_path):
    full = full_state()
    dc.save(_all_ranks(full, 2), tmp_path / "ckpt", parallel_sizes={"tensor_model_parallel_size": 2})
    run = [sys.executable, "-m", "megatron_core.dist_checkpointing"]
    out = subprocess.run([*run, "inspect", str(tmp_path / "ckpt")], capture_output=True, text=True, check=True).stdout
    assert f"version {dc.FORMAT_VERSION}" in out and "tensor_model_parallel_size=2" in out
    assert any(line.split()[:5] == ["col", "float32", "(16,", "6)", "2x1"] for line in out.splitlines())
    ok = subprocess.run([*run, "verify", str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert ok.returncode == 0 and "verified" in ok.stdout
    flip_byte(tmp_path / "ckpt" / "row" / "c.0.1", 3)
    bad = subprocess.run([*run, "verify", str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL  row" in bad.stdout and "ok    col" in bad.stdout
    (tmp_path / "ckpt" / "metadata.json").unlink()
    gone = subprocess.run([*run, "inspect", str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert gone.returncode == 2 and "incomplete checkpoint" in gone.stderr


def test_metadata_is_plain_json_without_pickle(tmp_path):
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(2, 2))}, tmp_path / "ckpt",
            parallel_sizes={"tensor_model_parallel_size": 1})
    raw = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert raw["tensors"]["w"]["global_shape"] == [2, 2] and raw["parallel_sizes"] == {"tensor_model_parallel_size": 1}
