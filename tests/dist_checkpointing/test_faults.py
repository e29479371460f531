"""Crash safety: a save killed with SIGKILL at random moments never damages what was committed."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor

N_TRIALS = 12


def _version(i: int) -> dict[str, torch.Tensor]:
    """Checkpoint number ``i``: ~20 MB, different in every tensor for every ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    out = {f"layer{j}.weight": torch.randn(512, 512, generator=g) for j in range(16)}
    out["embedding"] = torch.randn(1024, 512, generator=g).bfloat16()
    return out


def _sharded(i: int) -> dict:
    state: dict = {k: ShardedTensor.from_rank_offsets(k, v) for k, v in _version(i).items()}
    state["obj"] = ShardedObject("obj", {"version": i})
    return state


def _saver(root: str, overwrite_mode: bool, progress: str) -> None:
    """Save versions 0, 1, 2, ... forever (each to its own dir, or all over one dir)."""
    torch.set_num_threads(1)
    i = 0
    while True:
        target = Path(root) / ("ckpt" if overwrite_mode else f"ckpt_{i}")
        dc.save(_sharded(i), target, common_state_dict={"version": i}, overwrite=overwrite_mode)
        with open(progress, "a") as f:
            f.write(f"{i}\n")
            f.flush()
        i += 1


def _committed(progress: Path) -> list[int]:
    return [int(x) for x in progress.read_text().split()] if progress.exists() else []


def _assert_is_version(path: Path, i: int) -> None:
    plain = dc.load_plain_tensors(path)
    want = _version(i)
    assert plain.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(plain[k], v), f"{path}: {k} differs from version {i}"
    assert dc.load({"obj": ShardedObject("obj", None)}, path, strict="ignore")["obj"] == {"version": i}


def _check_after_kill(root: Path, overwrite_mode: bool, done: list[int]) -> str:
    """Everything committed loads bit-exact; everything else is refused. Returns what was found."""
    last = done[-1]
    if overwrite_mode:
        # the target always holds a complete checkpoint: the last reported one, or the next if the
        # kill came after its commit but before the progress note
        version = dc.load_common_state_dict(root / "ckpt")["version"]
        assert version in (last, last + 1)
        _assert_is_version(root / "ckpt", version)
    else:
        for i in done:
            _assert_is_version(root / f"ckpt_{i}", i)
        nxt = root / f"ckpt_{last + 1}"
        if nxt.exists():  # committed just before the kill
            _assert_is_version(nxt, last + 1)
        else:
            leftover = list(root.glob(f"{nxt.name}.tmp-*"))
            with pytest.raises(dc.CheckpointNotFoundError, match="unfinished save" if leftover else "does not exist"):
                dc.load_plain_tensors(nxt)
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


@pytest.mark.slow
def test_sigkill_during_save_never_damages_committed_checkpoints(tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "megatron_core.dist_checkpointing"])
    rnd = random.Random(0)
    outcomes = []
    for trial in range(N_TRIALS):
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        progress = root.parent / f"progress{trial}.txt"
        overwrite_mode = trial % 3 == 2
        proc = ctx.Process(target=_saver, args=(str(root), overwrite_mode, str(progress)), daemon=True)
        proc.start()
        deadline = time.monotonic() + 120
        while not _committed(progress):  # at least one committed checkpoint before the kill
            assert proc.is_alive() and time.monotonic() < deadline, "saver died or never committed"
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 0.6))
        proc.kill()  # SIGKILL: no cleanup, no finally
        proc.join()
        assert proc.exitcode == -9
        outcomes.append(_check_after_kill(root, overwrite_mode, _committed(progress)))
    # the random kills must actually have interrupted saves, not only landed between them
    assert outcomes.count("incomplete save refused") >= N_TRIALS // 3, outcomes
