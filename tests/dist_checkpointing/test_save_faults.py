"""Failure injection on real processes (two gloo ranks, TP=2 layout): a rank raising mid-save, a
write error from a file-size limit, a rank killed or stalled mid-save. Every rank raises, nothing
is committed, no temporary directory is left by a surviving rank 0, the previous checkpoint loads
bit-exact. Each fault is injected at a fixed point, so the tests are deterministic."""

from __future__ import annotations

import os
import pickle
import queue
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing as dc
from megatron_core import testing
from megatron_core.dist_checkpointing import save_job
from megatron_core.testing import run_distributed
from tests.dist_checkpointing.helpers import (
    assert_bit_exact,
    expected_local,
    flat_loaded,
    full_state,
    sharded,
)

OLD, NEW = full_state(seed=10), full_state(seed=11)


def _big(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(512, 256, generator=torch.Generator().manual_seed(seed))}  # 512 KiB


def _state(full: dict, rank: int) -> dict:
    state = sharded(full, rank, 2)
    if "w" in full:
        state["big"] = dc.ShardedTensor.from_rank_offsets("w", full["w"].chunk(2)[rank].clone(), (0, rank, 2))
    return state


def _save(full: dict, path: str, mode: str, **kw) -> None:
    rank = dist.get_rank()
    if mode == "async":
        dc.async_save(_state(full, rank), path, overwrite=True, **kw).wait()
    else:
        dc.save(_state(full, rank), path, overwrite=True, **kw)


def _assert_old_checkpoint(root: Path) -> None:
    """The previous checkpoint loads bit-exact and nothing else is left beside it."""
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("store")) == ["prev"]
    plain = dc.load_plain_tensors(root / "prev")
    for key in ("col", "row", "norm", "ids"):
        assert torch.equal(plain[key], OLD[key]), key
    assert torch.equal(plain["w"], _big(0)["w"])


# ---------------------------------------------------------------------------------- a rank raises
def _rank_raises(root: str) -> list[str]:
    rank = dist.get_rank()
    old, new = {**OLD, **_big(0)}, {**NEW, **_big(1)}
    dc.save(_state(old, rank), f"{root}/prev")
    real = save_job.write_shards

    def write_half_then_raise(tmp, items, **kw):
        real(tmp, items[: len(items) // 2], **kw)  # some files are on disk when it fails
        raise RuntimeError(f"injected failure on rank {rank}")

    if rank == 1:
        save_job.write_shards = write_half_then_raise
    messages = []
    for mode in ("sync", "async"):
        with pytest.raises(dc.SaveFailedError) as err:
            _save(new, f"{root}/prev", mode)
        messages.append(str(err.value))
    save_job.write_shards = real
    loaded = dc.load(sharded(OLD, rank, 2, empty=True), f"{root}/prev", strict="raise_missing")
    assert_bit_exact(flat_loaded(loaded), expected_local(OLD, rank, 2))
    return messages


def test_one_rank_raising_mid_save_fails_every_rank_and_commits_nothing(tmp_path):
    for messages in run_distributed(_rank_raises, 2, str(tmp_path), tmp_dir=tmp_path):
        for text in messages:
            assert "failed on 1 rank(s); nothing was committed" in text
            assert "rank 1: RuntimeError: injected failure on rank 1" in text
    _assert_old_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------- a write error
def _file_size_limit(root: str) -> list[str]:
    rank = dist.get_rank()
    old, new = {**OLD, **_big(0)}, {**NEW, **_big(1)}
    dc.save(_state(old, rank), f"{root}/prev")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:  # its 256 KiB shard of "w" no longer fits: write() fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))
    messages = []
    try:
        for mode in ("sync", "async"):
            with pytest.raises(dc.SaveFailedError) as err:
                _save(new, f"{root}/prev", mode)
            messages.append(str(err.value))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    return messages


def test_a_write_error_on_one_rank_fails_the_save_cleanly(tmp_path):
    for messages in run_distributed(_file_size_limit, 2, str(tmp_path), tmp_dir=tmp_path):
        for text in messages:
            assert "failed on 1 rank(s); nothing was committed" in text and "rank 1: " in text
            assert "File too large" in text or "EFBIG" in text or "errno 27" in text.lower(), text
    _assert_old_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------- a rank dies
def _dies_mid_save(root: str, victim: int, how: str, mode: str) -> tuple[float, str]:
    rank = dist.get_rank()
    dc.save(_state({**OLD, **_big(0)}, rank), f"{root}/prev")
    real = save_job.write_shards

    def die(tmp, items, **kw):
        real(tmp, items[:1], **kw)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)  # stalled (e.g. a hung file system): the others must not wait for it

    if rank == victim:
        save_job.write_shards = die
    start = time.monotonic()
    try:
        _save({**NEW, **_big(1)}, f"{root}/prev", mode, timeout=3.0)
    except dc.SaveFailedError as e:
        return time.monotonic() - start, str(e)
    return time.monotonic() - start, "no error"


def _run_survivor(tmp_path: Path, victim: int, how: str, mode: str) -> tuple[float, str, int | None]:
    """Two ranks; returns the survivor's (seconds until it raised, message) and the victim's exit code."""
    ctx = testing._context()
    results = ctx.Queue()
    store = str(tmp_path / f"store-{victim}-{how}")
    procs = [ctx.Process(target=testing._worker, args=(_dies_mid_save, r, 2, store, (str(tmp_path), victim, how, mode),
                                                       results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, ok, payload = results.get(timeout=120)
    except queue.Empty:
        pytest.fail("the surviving rank hung")
    finally:
        procs[victim].kill()
        for p in procs:
            p.join(30)
    assert rank == 1 - victim and ok, payload
    elapsed, message = pickle.loads(payload)
    return elapsed, message, procs[victim].exitcode


@pytest.mark.parametrize(("victim", "how", "mode"), [(1, "kill", "sync"), (0, "kill", "async"), (1, "stall", "async")])
def test_a_rank_killed_or_stalled_mid_save_makes_the_survivor_raise_within_the_timeout(tmp_path, victim, how, mode):
    elapsed, message, exitcode = _run_survivor(tmp_path, victim, how, mode)
    assert f"rank {1 - victim} lost contact with the other ranks" in message, message
    assert "Nothing was committed; the previous checkpoint is intact" in message
    assert elapsed < 3.0 + 15, elapsed  # the 3 s timeout (plus slack for a loaded machine), not forever
    if how == "kill":
        assert exitcode == -signal.SIGKILL
    leftovers = sorted(p.name for p in tmp_path.glob("prev.tmp-*"))
    if victim == 0:  # nobody was left to clean up: the torn directory is refused by name
        assert len(leftovers) == 1
        with pytest.raises(dc.IncompleteCheckpointError, match=leftovers[0]):
            dc.load_plain_tensors(tmp_path / leftovers[0])
        for p in tmp_path.glob("prev.tmp-*"):
            shutil.rmtree(p)
    else:
        assert leftovers == []  # rank 0 survived and removed it
    _assert_old_checkpoint(tmp_path)
