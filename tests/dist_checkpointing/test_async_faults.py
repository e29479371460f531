"""SIGKILL at random moments of an async save's background write (seeded, so deterministic): the
previous checkpoint always loads bit-exact and the torn one is refused by name.

The child process kills itself (SIGKILL: no cleanup, no finally) from inside the background save
at a point drawn at random: after the n-th tensor write completes, before the n-th fsync, before
writing an object file or the common state, before ``metadata.json``, or between ``metadata.json``
and the rename that commits it.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch

from megatron_core import dist_checkpointing as dc
from megatron_core import testing
from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor, save_job, tensorstore_io

N_TRIALS = 24
HOOKS = {"tensor": 6, "fsync": 14, "file": 2, "metadata": 1, "rename": 1}  # hook -> events to choose from


def _version(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    out = {f"layer{j}": torch.randn(256, 256, generator=g) for j in range(5)}
    out["emb"] = torch.randn(512, 64, generator=g).bfloat16()
    return out


def _sharded(i: int) -> dict:
    state: dict = {k: ShardedTensor.from_rank_offsets(k, v.clone()) for k, v in _version(i).items()}
    state["obj"] = ShardedObject("obj", {"version": i})
    return state


def _arm(hook: str, k: int) -> None:
    """Make the k-th event of ``hook`` during the next save SIGKILL this process."""
    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    if hook == "tensor":
        real_write = save_job.write_shards

        def write(tmp, items, on_bytes=None, **kw):
            return real_write(tmp, items, on_bytes=lambda n: tick(), **kw)

        save_job.write_shards = write
    elif hook == "fsync":
        real_fsync = tensorstore_io.fsync_path
        tensorstore_io.fsync_path = lambda path: (tick(), real_fsync(path))[1]
    elif hook == "file":
        real_file = save_job.write_file
        save_job.write_file = lambda path, data: (tick(), real_file(path, data))[1]
    elif hook == "metadata":
        real_meta = save_job.write_metadata
        save_job.write_metadata = lambda path, meta: (tick(), real_meta(path, meta))[1]
    else:
        real_commit = save_job.commit_directory
        save_job.commit_directory = lambda tmp, target: (tick(), real_commit(tmp, target))[1]


def _child(root: str, overwrite: bool, hook: str, k: int) -> None:
    torch.set_num_threads(1)
    prev = Path(root) / ("ckpt" if overwrite else "ckpt_0")
    dc.save(_sharded(0), prev, common_state_dict={"version": 0})
    _arm(hook, k)
    state = _sharded(1)
    handle = dc.async_save(state, Path(root) / ("ckpt" if overwrite else "ckpt_1"), {"version": 1},
                           overwrite=overwrite)
    for leaf in state.values():  # training goes on while the background write runs
        if isinstance(leaf, ShardedTensor):
            leaf.data.add_(1)
    handle.wait()
    os._exit(3)  # the hook never fired


def _assert_version(path: Path, i: int) -> None:
    plain = dc.load_plain_tensors(path)
    want = _version(i)
    assert plain.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(plain[key].view(torch.uint8), value.view(torch.uint8)), f"{path}: {key}"
    assert dc.load({"obj": ShardedObject("obj", None)}, path, strict="ignore")["obj"] == {"version": i}
    assert dc.load_common_state_dict(path) == {"version": i}


@pytest.mark.slow
def test_sigkill_during_async_background_write(tmp_path):
    ctx = testing._context()
    rnd = random.Random(15)
    seen = set()
    for trial in range(N_TRIALS):
        hook = rnd.choice(sorted(HOOKS))
        k = rnd.randint(1, HOOKS[hook])
        overwrite = trial % 2 == 1
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        proc = ctx.Process(target=_child, args=(str(root), overwrite, hook, k), daemon=True)
        proc.start()
        proc.join(120)
        assert proc.exitcode == -signal.SIGKILL, (trial, hook, k, proc.exitcode)
        seen.add(hook)
        torn = sorted(root.glob("ckpt*.tmp-*"))
        assert len(torn) == 1, (trial, hook, k, torn)
        if overwrite:
            _assert_version(root / "ckpt", 0)  # the previous checkpoint, bit-exact, still in place
        else:
            _assert_version(root / "ckpt_0", 0)
            with pytest.raises(dc.CheckpointNotFoundError, match=f"unfinished save.*{torn[0].name}"):
                dc.load_plain_tensors(root / "ckpt_1")
        if hook == "rename":  # complete, just never committed into place
            _assert_version(torn[0], 1)
        else:
            with pytest.raises(dc.IncompleteCheckpointError, match=torn[0].name):
                dc.load_plain_tensors(torn[0])
    assert seen == set(HOOKS), seen
