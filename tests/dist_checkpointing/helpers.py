"""Synthetic sharded state dicts shared by the dist_checkpointing tests.

``full_state(seed)`` is the global truth; ``sharded(full, rank, world)`` is what rank ``rank`` of
``world`` holds of it (tensors split along various axes, replicated ones with replica ids, a
swiglu-style factory, objects, nested dicts and lists).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing import ShardedObject, ShardedTensor, ShardedTensorFactory


def full_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Global tensors; every split axis is divisible by 4 (so worlds 1, 2, 4 all work)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "col": torch.randn(16, 6, generator=g).to(dtype),  # split on axis 0
        "row": torch.randn(5, 12, generator=g).to(dtype),  # split on axis 1
        "grid": torch.randn(8, 8, 3, generator=g).to(dtype),  # split on axes 0 and 1 at world 4
        "norm": torch.randn(6, generator=g).to(dtype),  # replicated
        "fc1": torch.randn(2 * 8, 6, generator=g).to(dtype),  # [gate; up], each split on axis 0
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.randn(4, 4, generator=g) > 0,
        "ids": torch.arange(8, dtype=torch.int32),
    }


def _swiglu_factory(key: str, local: torch.Tensor, rank: int, world: int) -> ShardedTensorFactory:
    """``local`` is this rank's [gate_r; up_r]; stored as fragments r and world+r of [gate; up]."""
    def build(k: str, data: torch.Tensor, replica_id: Any) -> list[ShardedTensor]:
        gate, up = torch.chunk(data, 2, dim=0)
        return [ShardedTensor.from_rank_offsets(k, gate, (0, rank, 2 * world), replica_id=replica_id),
                ShardedTensor.from_rank_offsets(k, up, (0, world + rank, 2 * world), replica_id=replica_id)]

    def merge(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=0)

    return ShardedTensorFactory(key, local, build, merge)


def local_fc1(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    gate, up = torch.chunk(full, 2, dim=0)
    return torch.cat([torch.chunk(gate, world)[rank], torch.chunk(up, world)[rank]])


def sharded(full: dict[str, torch.Tensor], rank: int, world: int, empty: bool = False,
            with_objects: bool = True) -> dict[str, Any]:
    """Rank ``rank``'s nested sharded state dict (``empty``: same layout, zeroed data to load into)."""
    def d(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t) if empty else t.clone()

    grid_rows, grid_cols = (2, 2) if world == 4 else (world, 1)
    gr, gc = rank // grid_cols, rank % grid_cols
    state: dict[str, Any] = {
        "model": {
            "col": ShardedTensor.from_rank_offsets("col", d(torch.chunk(full["col"], world)[rank]), (0, rank, world)),
            "row": ShardedTensor.from_rank_offsets("row", d(torch.chunk(full["row"], world, 1)[rank]),
                                                   (1, rank, world)),
            "grid": ShardedTensor.from_rank_offsets(
                "grid", d(torch.chunk(torch.chunk(full["grid"], grid_rows)[gr], grid_cols, 1)[gc]),
                (0, gr, grid_rows), (1, gc, grid_cols)),
            "norm": ShardedTensor.from_rank_offsets("norm", d(full["norm"]), replica_id=rank),
            "mlp": [_swiglu_factory("fc1", d(local_fc1(full["fc1"], rank, world)), rank, world)],
        },
        "step": ShardedTensor.from_rank_offsets("step", d(full["step"]), replica_id=(0, rank)),
        "mask": ShardedTensor.from_rank_offsets("mask", d(full["mask"]), replica_id=rank),
        "ids": ShardedTensor.from_rank_offsets("ids", d(torch.chunk(full["ids"], world)[rank]), (0, rank, world)),
    }
    if with_objects:
        state["extra"] = {
            "config": ShardedObject("config", None if empty else {"layers": 2, "name": "tiny"}, replica_id=rank),
            "rng": ShardedObject("rng", None if empty else {"rank": rank, "state": torch.arange(3) + rank},
                                 global_shape=(world,), global_offset=(rank,)),
        }
    return state


def expected_local(full: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Flat key -> what rank ``rank`` of ``world`` must hold after loading."""
    s = sharded(full, rank, world)
    return {"col": s["model"]["col"].data, "row": s["model"]["row"].data, "grid": s["model"]["grid"].data,
            "norm": full["norm"], "fc1": local_fc1(full["fc1"], rank, world), "step": full["step"],
            "mask": full["mask"], "ids": s["ids"].data}


def flat_loaded(loaded: dict[str, Any]) -> dict[str, torch.Tensor]:
    m = loaded["model"]
    return {"col": m["col"], "row": m["row"], "grid": m["grid"], "norm": m["norm"], "fc1": m["mlp"][0],
            "step": loaded["step"], "mask": loaded["mask"], "ids": loaded["ids"]}


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        # compare bytes, so that NaN patterns and -0.0 count too
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)), k


def inner_chunk_byte_ranges(chunk_file: Path, n_inner: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of every inner chunk of a sharding_indexed chunk file (index at the end:
    n_inner x (uint64 offset, uint64 nbytes), then a 4-byte crc32c)."""
    raw = chunk_file.read_bytes()
    index = raw[-(16 * n_inner + 4):-4]
    return [struct.unpack_from("<QQ", index, 16 * i) for i in range(n_inner)]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
