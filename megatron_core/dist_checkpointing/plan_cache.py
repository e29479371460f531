"""The save plan (storage layout of every key, object file paths) and its cache.

Planning gathers every rank's shard descriptions, validates their union and derives the layout;
at scale the gather dominates (every rank receives every description). Training saves the same
structure again and again, so the plan is cached, as PyTorch DCP caches its save plans: each rank
sends only a digest of its descriptions, and when every rank's digest matches the plan each one
holds, that plan is reused without gathering or validating anything again. Any change anywhere
(one shard moved, a key added, a new world size) makes every rank plan afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core.dist_checkpointing import comm
from megatron_core.dist_checkpointing.metadata import (
    OBJECTS_DIR,
    ShardRecord,
    TensorRecord,
    storage_name,
    torch_dtype,
)
from megatron_core.dist_checkpointing.planner import box_of, choose_chunk_shape, choose_inner_chunk_shape
from megatron_core.dist_checkpointing.validation import ShardDesc, validate_global

ObjectPaths = dict[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...], int]]


@dataclass(frozen=True)
class SavePlan:
    records: dict[str, TensorRecord]
    object_paths: ObjectPaths  # (key, offset) -> (relative file path, global shape, writing rank)


def digest(descs: Sequence[ShardDesc]) -> str:
    return hashlib.sha1(repr(list(descs)).encode()).hexdigest()


class PlanCache:
    """Remembers the last validated plan (per process) under the digests of all ranks' descriptions."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.plan_: SavePlan | None = None
        self.hits = 0  # saves that reused the plan (for tests and benchmarks)

    def clear(self) -> None:
        self.key, self.plan_ = None, None

    def plan(self, descs: list[ShardDesc], problems: list[str], unsafe: list[str], prep: Any, group: ProcessGroup | None
             ) -> tuple[SavePlan, Any, list[str], list[str]]:
        """Collective. Returns the plan, rank 0's ``prep`` and every rank's problems (local and global)."""
        gathered = comm.all_gather_object((digest(descs), self.key, prep, problems, unsafe), group=group)
        combined = hashlib.sha1("".join(g[0] for g in gathered).encode()).hexdigest()
        prep = gathered[0][2]
        problems = [p for g in gathered for p in g[3]]
        unsafe = [p for g in gathered for p in g[4]]
        if self.plan_ is not None and all(g[1] == combined for g in gathered):
            self.hits += 1
            return self.plan_, prep, problems, unsafe
        all_descs = [d for g in comm.all_gather_object(descs, group=group) for d in g]
        problems += validate_global(all_descs)
        plan = build_plan(all_descs) if not problems else SavePlan({}, {})
        if not problems:
            self.key, self.plan_ = combined, plan
        else:
            self.clear()
        return plan, prep, problems, unsafe


def build_plan(descs: Sequence[ShardDesc]) -> SavePlan:
    return SavePlan(tensor_records(descs), object_paths(descs))


def tensor_records(descs: Sequence[ShardDesc]) -> dict[str, TensorRecord]:
    """Storage layout of every key, computed identically on every rank from the gathered shards."""
    mains: dict[str, list[ShardDesc]] = {}
    for d in descs:
        if not d.is_object and d.main:
            mains.setdefault(d.key, []).append(d)
    records = {}
    itemsizes: dict[str, int] = {}
    for key in sorted(mains):
        shards = sorted(mains[key], key=lambda d: d.offset)
        global_shape = shards[0].global_shape
        boxes = [box_of(d.offset, d.shape) for d in shards]
        chunk = choose_chunk_shape(global_shape, boxes)
        split_axes = [a for a, (c, g) in enumerate(zip(chunk, global_shape, strict=True)) if c < g]
        dtype = str(shards[0].dtype)
        if dtype not in itemsizes:
            itemsizes[dtype] = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        records[key] = TensorRecord(
            path=storage_name(key), global_shape=global_shape, dtype=dtype, chunk_shape=chunk,
            inner_chunk_shape=choose_inner_chunk_shape(chunk, itemsizes[dtype], split_axes),
            # model_construct: the values come typed from ShardDesc; validating 100k records costs seconds
            shards=[ShardRecord.model_construct(offset=d.offset, shape=d.shape, rank=d.rank) for d in shards],
        )
    return records


def object_paths(descs: Sequence[ShardDesc]) -> ObjectPaths:
    out = {}
    for d in descs:
        if d.is_object and d.main:
            name = "shard_" + "_".join(str(o) for o in d.offset) + ".pt"
            out[(d.key, d.offset)] = (f"{OBJECTS_DIR}/{storage_name(d.key)}/{name}", d.global_shape, d.rank)
    return out
