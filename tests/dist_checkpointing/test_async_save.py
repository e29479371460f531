"""async_save: snapshot semantics, one save in flight, failures surfacing, exit, the cached plan."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor, save_job
from megatron_core.testing import run_distributed
from tests.dist_checkpointing.helpers import (
    assert_bit_exact,
    expected_local,
    flat_loaded,
    full_state,
    sharded,
)


@pytest.fixture
def slow_writes(monkeypatch):
    """Background writes start only when the test says so: the caller provably runs first."""
    gate = threading.Event()
    real = save_job.write_shards

    def gated(*args, **kwargs):
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(save_job, "write_shards", gated)
    yield gate
    gate.set()
    dc.wait_for_pending_saves()


def test_checkpoint_holds_the_values_at_the_call(tmp_path, slow_writes):
    full = full_state(seed=1)
    state = sharded(full, 0, 1)
    obj = state["extra"]["config"].data
    handle = dc.async_save(state, tmp_path / "ckpt", {"step": torch.tensor([3])})
    assert not handle.done()
    for leaf in (state["model"]["col"], state["model"]["norm"], state["ids"]):
        leaf.data.add_(100)  # training goes on: parameters change in place
    state["model"]["mlp"][0].data.mul_(-1)
    obj["layers"] = 99
    slow_writes.set()
    assert handle.wait() == (tmp_path / "ckpt").resolve() and handle.done()
    out = dc.load(sharded(full, 0, 1, empty=True), tmp_path / "ckpt")
    assert_bit_exact(flat_loaded(out), expected_local(full, 0, 1))
    assert out["extra"]["config"] == {"layers": 2, "name": "tiny"}
    assert torch.equal(dc.load_common_state_dict(tmp_path / "ckpt")["step"], torch.tensor([3]))


def test_one_save_in_flight_the_next_save_waits(tmp_path, slow_writes):
    first = dc.async_save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}, tmp_path / "a")
    threading.Timer(0.3, slow_writes.set).start()
    dc.save({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4))}, tmp_path / "b")
    assert first.done()  # save() waited for it before starting
    for name, value in (("a", 1.0), ("b", 0.0)):
        assert torch.equal(dc.load_plain_tensors(tmp_path / name)["w"], torch.full((4,), value))


def test_validation_problems_raise_at_the_call(tmp_path):
    bad = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4), (0, 0, 2))}  # half of the tensor
    with pytest.raises(dc.ShardingValidationError, match=r"w: .*gap \[4:8\]"):
        dc.async_save(bad, tmp_path / "ckpt")
    assert not list(tmp_path.iterdir())


def test_background_failure_surfaces_from_wait_and_from_the_next_save(tmp_path, monkeypatch):
    real = save_job.write_shards
    fail = {"on": True}

    def failing(*args, **kwargs):
        if fail["on"]:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(save_job, "write_shards", failing)
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4))}
    handle = dc.async_save(state, tmp_path / "a")
    with pytest.raises(dc.SaveFailedError, match=r"rank 0: OSError: .*No space left on device"):
        handle.wait()
    fail["on"] = False
    dc.save(state, tmp_path / "b")  # the failure was seen by wait(): not raised again
    fail["on"] = True
    dc.async_save(state, tmp_path / "c")  # nobody waits for this one ...
    fail["on"] = False
    with pytest.raises(dc.SaveFailedError, match=r"(?s)previous background save failed.*c' failed.*No space left"):
        dc.save(state, tmp_path / "d")  # ... so the next save raises it
    dc.save(state, tmp_path / "d")  # reported once; saving works again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "d"]  # no temporary directory left


def test_pending_save_is_waited_for_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import time, torch
        from megatron_core import dist_checkpointing as dc
        from megatron_core.dist_checkpointing import ShardedTensor, save_job
        real = save_job.write_shards
        def slow(*a, **k):
            time.sleep(1.0)
            return real(*a, **k)
        save_job.write_shards = slow
        dc.async_save({{"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0))}}, {str(tmp_path / "ckpt")!r})
        print("returned", flush=True)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "returned" and time.monotonic() - start > 1.0
    assert torch.equal(dc.load_plain_tensors(tmp_path / "ckpt")["w"], torch.arange(6.0))


def test_repeated_saves_reuse_the_validated_plan(tmp_path):
    cache = save_job._plan_cache
    cache.clear()
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(4)), "o": ShardedObject("o", [1])}
    dc.save(state, tmp_path / "a")
    hits = cache.hits
    dc.async_save(state, tmp_path / "b").wait()
    dc.save(state, tmp_path / "c")
    assert cache.hits == hits + 2
    bad = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(2), (0, 0, 2))}  # structure changed: planned again
    with pytest.raises(dc.ShardingValidationError, match="gap"):
        dc.save(bad, tmp_path / "d")
    assert cache.hits == hits + 2


# ---------------------------------------------------------------------------------- two ranks
def _two_ranks(full, root):
    rank, world = dist.get_rank(), dist.get_world_size()
    save_job._plan_cache.clear()
    state = sharded(full, rank, world)
    handle = dc.async_save(state, f"{root}/a", timeout=60)
    # training collectives on the default group while the save's own group votes in the background
    for _ in range(20):
        t = torch.ones(1000) * (rank + 1)
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((1000,), 3.0))
    state["model"]["col"].data.add_(1)
    handle.wait()
    dc.async_save(sharded(full, rank, world), f"{root}/b").wait()  # same structure: the plan is reused
    hits = save_job._plan_cache.hits
    plan = save_job._plan_cache.plan_
    assert plan is not None
    kept = plan.mains is not None  # the shard lists for metadata.json: only rank 0 keeps them
    loaded_b = dc.load(sharded(full, rank, world, empty=True), f"{root}/b")
    assert_bit_exact(flat_loaded(loaded_b), expected_local(full, rank, world))
    # one rank moves a shard: every rank notices, plans afresh and reports the overlap
    moved = sharded(full, rank, world)
    moved["model"]["col"] = ShardedTensor.from_rank_offsets("col", moved["model"]["col"].data, (0, 0, world))
    try:
        dc.async_save(moved, f"{root}/c")
        raised = ""
    except dc.ShardingValidationError as e:
        raised = str(e)
    loaded = dc.load(sharded(full, rank, world, empty=True), f"{root}/a")
    assert_bit_exact(flat_loaded(loaded), expected_local(full, rank, world))
    return hits, raised, kept


def test_two_ranks_async_save_with_concurrent_training_collectives(tmp_path):
    full = full_state(seed=4)
    results = run_distributed(_two_ranks, 2, full, str(tmp_path), tmp_dir=tmp_path)
    assert [kept for _, _, kept in results] == [True, False]
    for hits, raised, _ in results:
        assert hits == 1
        assert "col: global shape (16, 6): overlap [0:8, 0:6] is written by 2 main replicas" in raised


def test_snapshot_buffers_are_reused_only_after_a_commit_and_hold_the_values_at_each_call(tmp_path, monkeypatch):
    dc.release_snapshot_buffers()
    w = torch.arange(12.0).reshape(3, 4)
    state = {"w": ShardedTensor.from_rank_offsets("w", w), "b": ShardedTensor.from_rank_offsets("b", torch.ones(5))}
    first = dc.async_save(state, tmp_path / "a")
    assert first.reused_bytes == 0 and first.snapshot_bytes == (12 + 5) * 4
    first.wait()
    gate = threading.Event()
    real = save_job.write_shards
    monkeypatch.setattr(save_job, "write_shards", lambda *a, **k: (gate.wait(30), real(*a, **k))[1])
    w.mul_(-1)
    second = dc.async_save(state, tmp_path / "b")  # into the first save's buffers
    assert second.reused_bytes == second.snapshot_bytes
    w.add_(1000)  # after the call: not in the checkpoint
    gate.set()
    second.wait()
    loaded = {k: dc.load_plain_tensors(tmp_path / d)["w"] for k, d in (("a", "a"), ("b", "b"))}
    assert torch.equal(loaded["a"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(loaded["b"], -torch.arange(12.0).reshape(3, 4))
    # a changed shape reuses what still matches; a failed save gives nothing back; release frees all
    state["w"] = ShardedTensor.from_rank_offsets("w", torch.zeros(2, 4))
    monkeypatch.setattr(save_job, "write_shards", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    third = dc.async_save(state, tmp_path / "c")
    assert third.reused_bytes == 5 * 4
    with pytest.raises(dc.SaveFailedError, match="disk full"):
        third.wait()
    monkeypatch.setattr(save_job, "write_shards", real)
    assert dc.async_save(state, tmp_path / "d").reused_bytes == 0
    dc.wait_for_pending_saves()
    dc.release_snapshot_buffers()
    assert dc.async_save(state, tmp_path / "e").reused_bytes == 0
    dc.wait_for_pending_saves()
    assert torch.equal(dc.load_plain_tensors(tmp_path / "e")["w"], torch.zeros(2, 4))
