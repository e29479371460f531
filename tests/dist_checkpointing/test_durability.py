"""Durability: every file and directory of a checkpoint is fsync'd before ``metadata.json`` commits it.

tensorstore's own per-file fsync is off (the save fsyncs files itself, concurrently, as their writes
complete); these tests pin down that nothing is left to chance: a spy around the real ``os.fsync``
records which inode was synced when, and every entry of the committed checkpoint must have been
synced before the metadata file was. A SIGKILL cannot show a missing fsync (the page cache
survives the process), a power loss would: this is the check that stands in for one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedTensor
from megatron_core.dist_checkpointing.metadata import METADATA_FILE
from megatron_core.testing import run_distributed
from tests.dist_checkpointing.helpers import full_state, sharded

Inode = tuple[int, int]
Record = tuple[Inode, int, int]  # (device, inode), start ns, end ns (CLOCK_MONOTONIC: one clock per host)


def _spy_fsync(monkeypatch: pytest.MonkeyPatch | None) -> list[Record]:
    """Wrap the real ``os.fsync`` (it still runs) to record every synced inode with its timing."""
    real = os.fsync
    records: list[Record] = []

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        start = time.monotonic_ns()
        real(fd)
        records.append(((st.st_dev, st.st_ino), start, time.monotonic_ns()))

    if monkeypatch is not None:
        monkeypatch.setattr(os, "fsync", fsync)
    else:  # in a worker process, for its lifetime
        os.fsync = fsync  # type: ignore[assignment]
    return records


def _state(full: dict[str, torch.Tensor], rank: int, world: int) -> dict:
    state = sharded(full, rank, world)
    # big enough for the sharding codec (inner chunks + index), split on axis 0 across ranks
    big = torch.arange(1024 * 512, dtype=torch.float32).reshape(1024, 512)
    state["big"] = ShardedTensor.from_rank_offsets("big", big.chunk(world)[rank].clone(), (0, rank, world))
    return state


def _inode(path: Path) -> Inode:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _assert_synced_before_commit(path: Path, records: list[Record]) -> None:
    meta = _inode(path / METADATA_FILE)
    commit_start = min(start for ino, start, _ in records if ino == meta)
    synced = {ino for ino, _, end in records if end <= commit_start}
    entries = [path, *path.rglob("*")]
    assert len(entries) > 10  # key directories, zarr.json and chunk files, objects, common state
    unsynced = [str(p.relative_to(path.parent)) for p in entries
                if p.name != METADATA_FILE and _inode(p) not in synced]
    assert not unsynced, f"not fsync'd before {METADATA_FILE} was: {unsynced}"
    # the rename into place is made durable too: the parent directory is synced after the commit
    assert any(ino == _inode(path.parent) and start >= commit_start for ino, start, _ in records)


def test_every_file_and_directory_is_fsynced_before_metadata(tmp_path, monkeypatch):
    records = _spy_fsync(monkeypatch)
    full = full_state(seed=5)
    dc.save(_state(full, 0, 1), tmp_path / "ckpt", common_state_dict={"step": 3})
    _assert_synced_before_commit(tmp_path / "ckpt", records)
    out = dc.load(_state(full, 0, 1), tmp_path / "ckpt")  # and it is the right data
    assert torch.equal(out["big"], torch.arange(1024 * 512, dtype=torch.float32).reshape(1024, 512))


def test_overwrite_syncs_the_new_checkpoint_before_its_commit(tmp_path, monkeypatch):
    full = full_state(seed=6)
    dc.save(_state(full, 0, 1), tmp_path / "ckpt")
    records = _spy_fsync(monkeypatch)
    dc.save(_state(full, 0, 1), tmp_path / "ckpt", overwrite=True)
    _assert_synced_before_commit(tmp_path / "ckpt", records)


def _save_recording(full: dict[str, torch.Tensor], path: str) -> list[Record]:
    import torch.distributed as dist

    records = _spy_fsync(None)
    dc.save(_state(full, dist.get_rank(), dist.get_world_size()), path, common_state_dict={"step": 1})
    return records


def test_two_ranks_sync_their_own_files_before_rank0_commits(tmp_path):
    full = full_state(seed=7)
    per_rank = run_distributed(_save_recording, 2, full, str(tmp_path / "ckpt"), tmp_dir=tmp_path)
    assert all(per_rank)  # both ranks wrote (and synced) files
    _assert_synced_before_commit(tmp_path / "ckpt", [r for records in per_rank for r in records])
