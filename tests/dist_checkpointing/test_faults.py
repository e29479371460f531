"""Crash safety: a save killed (SIGKILL) at chosen points never damages what was committed.

The saver process commits version 0, then saves version 1 and kills itself with SIGKILL at one
chosen point of that save (deterministic: no timing, so it cannot flake on a faster or slower
machine). The points cover every step of a save -- tensor data half written, before the common
state, before ``metadata.json``, between ``metadata.json`` and the commit, right after the commit --
into a new directory and over an existing checkpoint (``overwrite``), the latter both with the
atomic ``renameat2(RENAME_EXCHANGE)`` swap and with it forced unavailable (the rename-aside fallback).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor


def _version(i: int) -> dict[str, torch.Tensor]:
    """Checkpoint number ``i``: different in every tensor for every ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    out = {f"layer{j}.weight": torch.randn(64, 32, generator=g) for j in range(8)}
    out["embedding"] = torch.randn(96, 32, generator=g).bfloat16()
    return out


def _sharded(i: int) -> dict:
    state: dict = {k: ShardedTensor.from_rank_offsets(k, v) for k, v in _version(i).items()}
    state["obj"] = ShardedObject("obj", {"version": i})
    return state


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally


def _kill_at(module: Any, name: str, armed: Callable[[], bool], after: bool = False,
             when: Callable[..., bool] = lambda *a, **k: True, half: bool = False) -> None:
    """Wrap ``module.name`` so that, once ``armed()``, the process dies just before (or after) a call
    that satisfies ``when``; ``half``: first pass on only the first half of the call's items."""
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hit = armed() and when(*args, **kwargs)
        if hit and half:
            root, items = args[0], args[1]
            original(root, items[: len(items) // 2], *args[2:], **kwargs)
            _die()
        if hit and not after:
            _die()
        result = original(*args, **kwargs)
        if hit and after:
            _die()
        return result

    setattr(module, name, wrapper)


def _install(point: str, armed: Callable[[], bool], fallback: bool) -> None:
    from megatron_core.dist_checkpointing import rename, save_job

    if fallback:
        rename._exchange = lambda a, b: False  # renameat2 unsupported (an old kernel, another OS)
    if point == "mid tensor data":
        _kill_at(save_job, "write_shards", armed, half=True)
    elif point == "before common state":
        _kill_at(save_job, "write_file", armed, when=lambda path, *a, **k: Path(path).name == "common.pt")
    elif point == "before metadata":
        _kill_at(save_job, "write_metadata", armed)
    elif point == "before commit":
        _kill_at(save_job, "commit_directory", armed)
    elif point == "after commit":
        _kill_at(save_job, "commit_directory", armed, after=True)
    elif point == "old moved aside":  # the fallback's window: the old checkpoint renamed away, the new not in yet
        _kill_at(os, "rename", armed, after=True, when=lambda src, dst: ".old-" in os.fspath(dst))
    elif point == "before discarding the old":
        _kill_at(rename, "discard_checkpoint", armed)
    else:
        raise ValueError(point)


def _saver(root: str, overwrite_mode: bool, point: str, fallback: bool) -> None:
    """Commit version 0, then save version 1 and die at ``point``."""
    torch.set_num_threads(1)
    version = [0]
    _install(point, lambda: version[0] >= 1, fallback)
    for i in range(2):
        version[0] = i
        target = Path(root) / ("ckpt" if overwrite_mode else f"ckpt_{i}")
        dc.save(_sharded(i), target, common_state_dict={"version": i}, overwrite=overwrite_mode)
    raise AssertionError(f"the kill point {point!r} was never reached")


def _assert_is_version(path: Path, i: int) -> None:
    plain = dc.load_plain_tensors(path)
    want = _version(i)
    assert plain.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(plain[k], v), f"{path}: {k} differs from version {i}"
    assert dc.load({"obj": ShardedObject("obj", None)}, path, strict="ignore")["obj"] == {"version": i}


def _leftovers(root: Path) -> str:
    """What the interrupted save left beside the committed checkpoints."""
    found = "clean"
    for leftover in root.glob("ckpt*.tmp-*"):
        try:
            dc.load_plain_tensors(leftover)
        except dc.IncompleteCheckpointError:
            found = "incomplete save refused"
        else:  # killed between writing metadata.json and the rename: complete, just not in place
            _assert_is_version(leftover, dc.load_common_state_dict(leftover)["version"])
            found = "complete but uncommitted save"
    return found


CASES = [
    # (kill point, overwrite, renameat2 forced off, version found at the target, leftover)
    ("mid tensor data", False, False, None, "incomplete save refused"),
    ("before common state", False, False, None, "incomplete save refused"),
    ("before metadata", False, False, None, "incomplete save refused"),
    ("before commit", False, False, None, "complete but uncommitted save"),
    ("after commit", False, False, 1, "clean"),
    ("mid tensor data", True, False, 0, "incomplete save refused"),
    ("before metadata", True, False, 0, "incomplete save refused"),
    ("before commit", True, False, 0, "complete but uncommitted save"),
    ("before discarding the old", True, False, 1, "complete but uncommitted save"),
    ("after commit", True, False, 1, "clean"),
    ("before commit", True, True, 0, "complete but uncommitted save"),
    ("old moved aside", True, True, 0, "complete but uncommitted save"),
    ("after commit", True, True, 1, "clean"),
]


@pytest.mark.parametrize("point, overwrite_mode, fallback, at_target, leftover", CASES,
                         ids=[f"{c[0]}{' overwrite' if c[1] else ''}{' no-renameat2' if c[2] else ''}" for c in CASES])
def test_kill_during_save_never_damages_committed_checkpoints(tmp_path, point, overwrite_mode, fallback, at_target,
                                                              leftover):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "megatron_core.dist_checkpointing"])
    proc = ctx.Process(target=_saver, args=(str(tmp_path), overwrite_mode, point, fallback), daemon=True)
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, f"the saver exited with {proc.exitcode}, not killed at {point!r}"
    if overwrite_mode:
        # Always a complete checkpoint at the target (after the fallback's window: restored on read).
        _assert_is_version(tmp_path / "ckpt", at_target)
        assert not list(tmp_path.glob("ckpt.old-*"))
    else:
        _assert_is_version(tmp_path / "ckpt_0", 0)
        if at_target is None:
            with pytest.raises(dc.CheckpointNotFoundError, match="unfinished save|does not exist"):
                dc.load_plain_tensors(tmp_path / "ckpt_1")
        else:
            _assert_is_version(tmp_path / "ckpt_1", at_target)
    assert _leftovers(tmp_path) == leftover
