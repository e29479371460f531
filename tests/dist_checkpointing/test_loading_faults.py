"""One rank failing during a load: every rank raises (naming the failing rank), none hangs.

Two real gloo processes load a checkpoint in which only rank 1's part is damaged (rank 0 asks for
other tensors, so it reads nothing damaged): a chunk file deleted, a chunk file overwritten with
garbage, a chunk file truncated, or rank 1 asking for a key the checkpoint does not have.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing as dc
from megatron_core.dist_checkpointing import ShardedTensor
from megatron_core.testing import run_distributed

FULL = {"w": torch.arange(32, dtype=torch.float32).reshape(4, 8), "b": torch.linspace(-1, 1, 8)}


def _save(path: str) -> None:
    rank = dist.get_rank()
    dc.save({"w": ShardedTensor.from_rank_offsets("w", FULL["w"][2 * rank:2 * rank + 2].clone(), (0, rank, 2)),
             "b": ShardedTensor.from_rank_offsets("b", FULL["b"].clone(), replica_id=rank)}, path)


def _load(path: str, missing_key: bool) -> tuple[str, str]:
    """Rank 0 loads ``b`` only; rank 1 its rows of ``w`` (or a key that is not there)."""
    if dist.get_rank() == 0:
        request = {"b": ShardedTensor.from_rank_offsets("b", torch.empty(8))}
    else:
        key = "not_in_checkpoint" if missing_key else "w"
        request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(2, 8), (0, 1, 2))}
    try:
        loaded = dc.load(request, path)
    except Exception as e:  # what each rank sees is the test's result
        return type(e).__name__, str(e)
    return "loaded", str({k: v.tolist() for k, v in loaded.items()})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load_faults") / "ckpt"
    run_distributed(_save, 2, str(path), tmp_dir=path.parent)
    return path


def _damage(src: Path, dst: Path, how: str) -> None:
    import shutil

    shutil.copytree(src, dst)
    chunks = [p for p in (dst / "w").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks, sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    for chunk in chunks:  # rank 0 reads nothing of w: damage all of it
        if how == "deleted":
            chunk.unlink()
        elif how == "garbage":
            chunk.write_bytes(b"\x00garbage" * 64)
        elif how == "truncated":
            chunk.write_bytes(chunk.read_bytes()[:7])


@pytest.mark.parametrize("how", ["deleted", "garbage", "truncated", "missing key"])
def test_one_rank_failing_during_a_load_makes_every_rank_raise(saved, tmp_path, how):
    path = saved
    if how != "missing key":
        path = tmp_path / "damaged"
        _damage(saved, path, how)
    results = run_distributed(_load, 2, str(path), how == "missing key", tmp_dir=tmp_path, timeout=90)
    (kind0, msg0), (kind1, msg1) = results
    assert kind0 == kind1 != "loaded", results  # the same error class on both ranks
    if how == "missing key":  # found by the request check every rank votes on before reading
        assert kind0 == "CheckpointMismatchError" and all("not_in_checkpoint" in m for m in (msg0, msg1))
    else:  # found while reading by rank 1 alone; rank 0 read nothing damaged and still raises
        assert msg0.startswith("rank 1 failed to load: w: "), msg0
        assert msg1.startswith("w: ") and "c.1.0" in msg1, msg1
