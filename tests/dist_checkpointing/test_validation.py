"""The save's validation on gathered descriptions (main replicas in full, other replicas only as
signatures) and the layout planned from it, against the straightforward computation."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor, save_job
from megatron_core.dist_checkpointing.metadata import METADATA_FILE
from megatron_core.dist_checkpointing.plan_cache import plan_validated, tensor_records
from megatron_core.dist_checkpointing.validation import (
    ShardDesc,
    summarize,
    validate_gathered,
    validate_global,
)


def _desc(key, rank, offset, shape, main=True, global_shape=(8, 4), dtype="float32", is_object=False):
    return ShardDesc(key, is_object, global_shape, dtype, offset, shape, main, rank)


def _tp2_dp2() -> list[ShardDesc]:
    """w split in rows over TP (ranks 0,1 main; 2,3 their DP replicas), b replicated everywhere."""
    out = []
    for rank in range(4):
        tp, dp = rank % 2, rank // 2
        out.append(_desc("w", rank, (4 * tp, 0), (4, 4), main=dp == 0))
        out.append(_desc("b", rank, (0,), (4,), main=rank == 0, global_shape=(4,)))
    return out


def _gathered(descs):
    ranks = sorted({d.rank for d in descs})
    return [summarize([d for d in descs if d.rank == r], r) for r in ranks]


def test_a_replica_disagreeing_on_the_global_shape_is_reported_with_its_rank():
    descs = _tp2_dp2()
    descs[6] = _desc("w", 3, (4, 0), (4, 4), main=False, global_shape=(8, 5))  # rank 3's replica of w
    assert validate_global(descs) == ["w: ranks disagree on the global shape: (8, 4) on ranks [0, 1, 2]; "
                                      "(8, 5) on ranks [3]"]


def test_a_replica_disagreeing_on_the_dtype_is_reported_and_tiling_still_checked():
    descs = _tp2_dp2()
    descs[4] = _desc("w", 2, (0, 0), (4, 4), main=False, dtype="bfloat16")
    descs[2] = _desc("w", 1, (4, 0), (4, 4), main=False)  # now nobody writes rows 4:8
    problems = validate_global(descs)
    assert problems[0] == "w: ranks disagree on the dtype: bfloat16 on ranks [2]; float32 on ranks [0, 1, 3]"
    assert problems[1].startswith("w: global shape (8, 4): gap [4:8, 0:4] is covered by no main replica")
    assert len(problems) == 2


def test_a_key_held_only_as_replicas_is_a_gap_and_a_tensor_object_mix_is_named():
    descs = [_desc("r", 0, (0,), (3,), main=False, global_shape=(3,)),
             _desc("m", 0, (0,), (3,), global_shape=(3,)),
             _desc("m", 1, (0,), (1,), main=False, global_shape=(3,), dtype=None, is_object=True)]
    assert validate_global(descs) == ["m: used both as a ShardedTensor and as a ShardedObject",
                                      "r: global shape (3,): gap [0:3] is covered by no main replica (every "
                                      "element needs one shard with replica_id 0)"]


def test_the_plan_from_gathered_summaries_equals_the_plan_from_every_description():
    descs = _tp2_dp2() + [_desc("v", r, (2 * r, 0), (2, 6), global_shape=(8, 6)) for r in (3, 1, 0, 2)]
    validated = validate_gathered(_gathered(descs))
    assert validated.problems == []
    assert validated.grids["w"] == [[0, 4, 8], [0, 4]]
    plan = plan_validated(validated)
    assert all(rec.shards == [] for rec in plan.records.values())  # only rank 0 needs them, when it commits
    assert plan.full_records() == tensor_records(descs)
    assert [s.rank for s in plan.full_records()["v"].shards] == [0, 1, 2, 3]  # sorted by offset
    # only main replicas travel in full: the replicas of w and b are signatures
    assert [len(p.mains) for p in _gathered(descs)] == [3, 2, 1, 1]
    assert _gathered(descs)[3].replicas == [("w", False, (8, 4), "float32"), ("b", False, (4,), "float32")]


def test_a_changed_structure_is_planned_afresh_and_then_cached_again(tmp_path):
    cache = save_job._plan_cache
    cache.clear()
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4)), "o": ShardedObject("o", [1])}
    dc.save(state, tmp_path / "a")
    hits = cache.hits
    dc.save(state, tmp_path / "b")
    assert cache.hits == hits + 1
    grown = {**state, "v": ShardedTensor.from_rank_offsets("v", torch.arange(6.0).reshape(2, 3))}
    dc.async_save(grown, tmp_path / "c").wait()  # a new key: a miss, and the new plan's layout is used
    assert cache.hits == hits + 1
    meta = json.loads((tmp_path / "c" / METADATA_FILE).read_text())
    assert sorted(meta["tensors"]) == ["v", "w"] and meta["tensors"]["v"]["shards"] == [
        {"offset": [0, 0], "shape": [2, 3], "rank": 0}]
    assert torch.equal(dc.load_plain_tensors(tmp_path / "c")["v"], torch.arange(6.0).reshape(2, 3))
    dc.save(grown, tmp_path / "d")
    assert cache.hits == hits + 2  # and that plan is reused in turn
    meta_d = json.loads((tmp_path / "d" / METADATA_FILE).read_text())
    assert meta_d["tensors"]["v"]["shards"] == meta["tensors"]["v"]["shards"]
    with pytest.raises(dc.CheckpointExistsError):
        dc.save(grown, tmp_path / "d")
