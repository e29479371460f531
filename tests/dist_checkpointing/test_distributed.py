"""Save and load on real gloo processes: N ranks -> M ranks, data parallel writers, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing as dc
from megatron_core import parallel_state
from megatron_core.dist_checkpointing import ShardedTensor, save_job, tensorstore_io
from megatron_core.dist_checkpointing.metadata import read_metadata
from megatron_core.testing import run_distributed
from tests.dist_checkpointing.helpers import (
    assert_bit_exact,
    expected_local,
    flat_loaded,
    full_state,
    sharded,
)


def _load_and_check(full, path: Path, same_world: bool) -> None:
    rank, world = dist.get_rank() if dist.is_initialized() else 0, dist.get_world_size() if dist.is_initialized() else 1
    request = sharded(full, rank, world, empty=True)
    if not same_world:
        del request["extra"]["rng"]  # per-rank objects only come back at the same world size
    out = dc.load(request, path, strict="raise" if same_world else "raise_missing")
    assert_bit_exact(flat_loaded(out), expected_local(full, rank, world))
    assert out["extra"]["config"] == {"layers": 2, "name": "tiny"}
    if same_world:
        assert out["extra"]["rng"]["rank"] == rank


def _load_then_save(full, loads: list[tuple[str, bool]], save_to: str | None) -> None:
    for path, same_world in loads:
        _load_and_check(full, Path(path), same_world)
    if save_to is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        dc.save(sharded(full, rank, world), save_to, common_state_dict={"world": world})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_at_n_ranks_load_at_m_ranks(tmp_path, dtype):
    full = full_state(seed=3, dtype=dtype)
    w1, w2, w4 = (str(tmp_path / f"ckpt_w{n}") for n in (1, 2, 4))
    dc.save(sharded(full, 0, 1), w1, common_state_dict={"world": 1})  # no torch.distributed at all
    run_distributed(_load_then_save, 4, full, [(w1, False)], w4, tmp_dir=tmp_path)
    run_distributed(_load_then_save, 2, full, [(w4, False), (w1, False)], w2, tmp_dir=tmp_path)
    run_distributed(_load_then_save, 4, full, [(w2, False), (w4, True)], None, tmp_dir=tmp_path)
    for path in (w2, w4):
        _load_and_check(full, Path(path), same_world=False)
    assert dc.load_common_state_dict(w4) == {"world": 4}
    assert read_metadata(w2).tensors["fc1"].chunk_shape == (4, 6)  # 2 ranks x (gate, up) fragments


# ------------------------------------------------------------------------------ data parallel
def _tp_dp_state(full, empty=False):
    """TP=2 x DP=2: TP-split tensors replicated over DP; replicated ones over TP and DP."""
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()

    def d(t):
        return torch.zeros_like(t) if empty else t.clone()

    return {
        "col": ShardedTensor.from_rank_offsets("col", d(full["col"].chunk(tp)[tp_rank]), (0, tp_rank, tp),
                                               replica_id=(0, 0, dp_rank)),
        "row": ShardedTensor.from_rank_offsets("row", d(full["row"].chunk(tp, 1)[tp_rank]), (1, tp_rank, tp),
                                               replica_id=(0, 0, dp_rank)),
        "norm": ShardedTensor.from_rank_offsets("norm", d(full["norm"]), replica_id=(0, tp_rank, dp_rank)),
    }


def _save_tp2_dp2(full, path):
    parallel_state.initialize_model_parallel(2)
    written = []
    real_write = tensorstore_io.write_shards

    def recording(root, items, **kwargs):  # the real writer, plus a note of what this rank wrote
        written.extend((item.key, item.offset) for item in items)
        return real_write(root, items, **kwargs)

    save_job.write_shards = recording
    try:
        dc.save(_tp_dp_state(full), path)
    finally:
        save_job.write_shards = real_write
    out = dc.load(_tp_dp_state(full, empty=True), path)
    for key, want in _tp_dp_state(full).items():
        assert torch.equal(out[key], want.data), key
    return dist.get_rank(), parallel_state.get_data_parallel_rank(), written


def test_data_parallel_each_chunk_written_by_exactly_one_rank(tmp_path):
    full = full_state(seed=5)
    path = str(tmp_path / "ckpt")
    results = run_distributed(_save_tp2_dp2, 4, full, path, tmp_dir=tmp_path)
    writers: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for rank, dp_rank, written in results:
        assert dp_rank == 0 or written == [], f"rank {rank} (DP rank {dp_rank}) wrote {written}"
        for chunk in written:
            writers.setdefault(chunk, []).append(rank)
    assert writers == {("col", (0, 0)): [0], ("col", (8, 0)): [1], ("row", (0, 0)): [0], ("row", (0, 6)): [1],
                       ("norm", (0,)): [0]}
    meta = read_metadata(path)
    assert meta.parallel_sizes == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                                   "data_parallel_size": 2}
    assert {(k, s.offset): [s.rank] for k, r in meta.tensors.items() for s in r.shards} == writers
    plain = dc.load_plain_tensors(path)
    assert all(torch.equal(plain[k], full[k]) for k in ("col", "row", "norm"))


# ------------------------------------------------------------------------------ failures
def _save_catching(path, kind):
    rank = dist.get_rank()
    if kind == "write_fails":
        # rank 1's tensor lives on the meta device: it passes validation, then cannot be written
        data = torch.ones(4) if rank == 0 else torch.empty(4, device="meta")
        state = {"w": ShardedTensor.from_rank_offsets("w", data, (0, rank, 2))}
    else:  # both ranks claim to be the main replica of the same tensor
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}
    try:
        dc.save(state, path)
    except dc.CheckpointingError as e:
        return type(e).__name__, str(e)
    return None


def test_a_failing_rank_makes_every_rank_raise_and_nothing_is_committed(tmp_path):
    path = str(tmp_path / "ckpt")
    results = run_distributed(_save_catching, 2, path, "write_fails", tmp_dir=tmp_path)
    for name, msg in results:
        assert name == "SaveFailedError" and "failed on 1 rank(s); nothing was committed" in msg and "rank 1:" in msg
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob("ckpt.tmp-*"))


def test_overlapping_main_replicas_across_ranks_are_reported_on_every_rank(tmp_path):
    results = run_distributed(_save_catching, 2, str(tmp_path / "ckpt"), "overlap", tmp_dir=tmp_path)
    for name, msg in results:
        assert name == "ShardingValidationError"
        assert "w: global shape (4,): overlap [0:4] is written by 2 main replicas: rank 0" in msg and "rank 1" in msg
    assert results[0] == results[1] and not list(tmp_path.glob("ckpt*"))


def _pipeline_like_load(path):
    """Each rank asks for a different key (like pipeline stages): nothing is 'unexpected'."""
    rank = dist.get_rank()
    key = ["a", "b"][rank]
    out = dc.load({key: ShardedTensor.from_rank_offsets(key, torch.empty(3))}, path)
    try:
        missing = {"c": ShardedTensor.from_rank_offsets("c", torch.empty(1))} if rank == 1 else {}
        dc.load({key: ShardedTensor.from_rank_offsets(key, torch.empty(3)), **missing}, path)
    except dc.MissingKeyError as e:
        return out[key], str(e)
    return out[key], None


def test_key_checks_are_global_over_ranks(tmp_path):
    path = tmp_path / "ckpt"
    dc.save({"a": ShardedTensor.from_rank_offsets("a", torch.ones(3)),
             "b": ShardedTensor.from_rank_offsets("b", torch.full((3,), 2.0))}, path)
    (a, err0), (b, err1) = run_distributed(_pipeline_like_load, 2, str(path), tmp_dir=tmp_path)
    assert torch.equal(a, torch.ones(3)) and torch.equal(b, torch.full((3,), 2.0))
    assert err0 == err1 and err0 is not None and "1 missing keys" in err0  # rank 0 raises rank 1's problem too
