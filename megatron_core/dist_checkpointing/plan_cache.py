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
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core.dist_checkpointing import comm
from megatron_core.dist_checkpointing.gc_pause import gc_paused
from megatron_core.dist_checkpointing.metadata import (
    OBJECTS_DIR,
    ShardRecord,
    TensorRecord,
    storage_name,
    torch_dtype,
)
from megatron_core.dist_checkpointing.planner import (
    box_of,
    choose_chunk_shape,
    choose_inner_chunk_shape,
    chunk_shape_of_grid,
)
from megatron_core.dist_checkpointing.validation import ShardDesc, Validated, summarize, validate_gathered

ObjectPaths = dict[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...], int]]


@dataclass
class SavePlan:
    """What every rank writes where. ``records`` hold the layout; their ``shards`` (the list of
    every stored box, only needed in ``metadata.json``, which rank 0 writes) are filled in by
    ``full_records`` on first use, off the planning path every rank waits for."""

    records: dict[str, TensorRecord]
    object_paths: ObjectPaths  # (key, offset) -> (relative file path, global shape, writing rank)
    # keys whose records lack their shards -> their main replicas; None: dropped (ranks other than 0,
    # which never write metadata.json: at thousands of ranks these are ~100 MB a rank would keep cached)
    mains: dict[str, list[ShardDesc]] | None = field(default_factory=dict)
    _full: dict[str, TensorRecord] | None = None

    def full_records(self) -> dict[str, TensorRecord]:
        """``records`` with every stored shard listed (built once per plan; the plan is cached)."""
        if self._full is None:
            mains = self.mains
            if mains is None:
                raise RuntimeError("this rank's save plan dropped the shard lists: only rank 0 writes metadata.json")
            with gc_paused():
                self._full = {key: rec if key not in mains else rec.model_copy(update={"shards": [
                    ShardRecord(offset=d.offset, shape=d.shape, rank=d.rank)
                    for d in sorted(mains[key], key=_offset)]}) for key, rec in self.records.items()}
            self.mains = {}  # now in the records
        return self._full


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
        with gc_paused():  # hundreds of thousands of small objects: see gc_pause
            validated = validate_gathered(comm.all_gather_object(summarize(descs, comm.rank()), group=group))
            problems += validated.problems
            plan = plan_validated(validated) if not problems else SavePlan({}, {})
            del validated
        if comm.rank() != 0:
            plan.mains = None
        if not problems:
            self.key, self.plan_ = combined, plan
        else:
            self.clear()
        return plan, prep, problems, unsafe


def plan_validated(validated: Validated) -> SavePlan:
    """The plan from validated main replicas (``validation.validate_gathered`` without problems)."""
    objects = [d for group in validated.mains.values() for d in group if d.is_object]
    tensors = {key: group for key, group in validated.mains.items() if group and not group[0].is_object}
    return SavePlan(_records(tensors, validated.grids, with_shards=False), object_paths(objects), tensors)


def build_plan(descs: Sequence[ShardDesc]) -> SavePlan:
    """The plan of already validated descriptions (all ranks'), e.g. of a single process."""
    return SavePlan(tensor_records(descs), object_paths(descs))


def tensor_records(descs: Sequence[ShardDesc]) -> dict[str, TensorRecord]:
    """Storage layout of every key, computed identically on every rank from the gathered shards."""
    mains: dict[str, list[ShardDesc]] = {}
    for d in descs:
        if not d.is_object and d.main:
            mains.setdefault(d.key, []).append(d)
    return _records(mains, {}, with_shards=True)


def _records(mains: dict[str, list[ShardDesc]], grids: dict[str, list[list[int]]], with_shards: bool
             ) -> dict[str, TensorRecord]:
    records = {}
    itemsizes: dict[str, int] = {}
    for key in sorted(mains):
        shards = mains[key]
        global_shape = shards[0].global_shape
        cuts = grids.get(key)
        chunk = (chunk_shape_of_grid(cuts) if cuts is not None
                 else choose_chunk_shape(global_shape, [box_of(d.offset, d.shape) for d in shards]))
        split_axes = [a for a, (c, g) in enumerate(zip(chunk, global_shape, strict=True)) if c < g]
        dtype = str(shards[0].dtype)
        if dtype not in itemsizes:
            itemsizes[dtype] = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        records[key] = TensorRecord.model_construct(
            path=storage_name(key), global_shape=global_shape, dtype=dtype, chunk_shape=chunk,
            inner_chunk_shape=choose_inner_chunk_shape(chunk, itemsizes[dtype], split_axes),
            shards=[ShardRecord(offset=d.offset, shape=d.shape, rank=d.rank) for d in sorted(shards, key=_offset)]
            if with_shards else [],
            zarr_json_crc32c=None,
        )
    return records


_offset = operator.attrgetter("offset")


def object_paths(descs: Sequence[ShardDesc]) -> ObjectPaths:
    out = {}
    for d in descs:
        if d.is_object and d.main:
            name = "shard_" + "_".join(str(o) for o in d.offset) + ".pt"
            out[(d.key, d.offset)] = (f"{OBJECTS_DIR}/{storage_name(d.key)}/{name}", d.global_shape, d.rank)
    return out
