"""Checks before anything is written or read, and the errors they produce.

Save: every key's *main* replicas must tile its global shape exactly once; all ranks must agree
on each key's global shape and dtype. Every problem is reported at once, with key, box and ranks.

Load: requested keys are matched against ``metadata.json``; missing keys, unexpected keys (saved
but requested by no rank), shape and dtype mismatches are gathered into one error (or warning).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import torch

from megatron_core.dist_checkpointing.errors import (
    CheckpointMismatchError,
    DTypeMismatchError,
    MissingKeyError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron_core.dist_checkpointing.metadata import CheckpointMetadata, dtype_name
from megatron_core.dist_checkpointing.planner import Box, box_of, coverage, grid_cuts

logger = logging.getLogger(__name__)
_MAX_LISTED = 100  # per key and kind of problem, to keep messages bounded


class StrictHandling(StrEnum):
    """What ``load`` does about missing and unexpected keys (shape/dtype mismatches always raise).

    ``raise``: both are errors. ``raise_missing``: missing keys are errors, unexpected keys are
    fine (loading part of a checkpoint, e.g. only the model of a training checkpoint).
    ``warn``: log both. ``ignore``: say nothing.
    """

    RAISE = "raise"
    RAISE_MISSING = "raise_missing"
    WARN = "warn"
    IGNORE = "ignore"


def fmt_box(box: Box) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


class ShardDesc(NamedTuple):
    """What one rank will write (or holds as a replica): enough to check the global tiling.

    A named tuple: hundreds of thousands of them are pickled, gathered and grouped at scale.
    """

    key: str
    is_object: bool
    global_shape: tuple[int, ...]
    dtype: str | None
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    main: bool
    rank: int


#: What every holder of a key must agree on: (key, is_object, global shape, dtype).
Signature = tuple[str, bool, tuple[int, ...], str | None]


class RankShards(NamedTuple):
    """One rank's part of the save's gather: its main replicas in full; of the other replicas only
    what must agree across ranks (their boxes are never written, so never checked)."""

    rank: int
    mains: list[ShardDesc]
    replicas: list[Signature]  # distinct


def summarize(descs: Sequence[ShardDesc], rank: int) -> RankShards:
    return RankShards(rank, [d for d in descs if d.main],
                      list(dict.fromkeys((d.key, d.is_object, d.global_shape, d.dtype) for d in descs if not d.main)))


@dataclass
class Validated:
    """The outcome of ``validate_gathered``: the problems, and what planning the layout reuses."""

    problems: list[str]
    mains: dict[str, list[ShardDesc]]  # key -> its main replicas, in gathered (rank) order
    grids: dict[str, list[list[int]]]  # key -> cut points per axis, where the mains form an exact grid


def describe_for_save(leaves: Sequence[ShardedTensor | ShardedObject], rank: int) -> tuple[list[ShardDesc], list[str]]:
    """This rank's shard descriptions, and the problems visible locally (data vs. description)."""
    descs, problems = [], []
    for leaf in leaves:
        if isinstance(leaf, ShardedObject):
            descs.append(ShardDesc(leaf.key, True, tuple(leaf.global_shape), None, tuple(leaf.global_offset),
                                   (1,) * len(leaf.global_shape), leaf.is_main_replica, rank))
            continue
        name = None
        try:
            name = dtype_name(leaf.dtype)
        except Exception as e:  # reported with the others rather than one at a time
            problems.append(f"rank {rank}: {leaf.key}: {e}")
        if leaf.data is None:
            problems.append(f"rank {rank}: {leaf.key}: ShardedTensor has no data to save")
        else:
            if tuple(leaf.data.shape) != tuple(leaf.local_shape):
                problems.append(f"rank {rank}: {leaf.key}: data shape {tuple(leaf.data.shape)} differs from "
                                f"local_shape {tuple(leaf.local_shape)}")
            if leaf.data.dtype != leaf.dtype:
                problems.append(f"rank {rank}: {leaf.key}: data dtype {leaf.data.dtype} differs from the "
                                f"declared dtype {leaf.dtype}")
        descs.append(ShardDesc(leaf.key, False, tuple(leaf.global_shape), name, tuple(leaf.global_offset),
                               leaf.full_local_shape, leaf.is_main_replica, rank))
    return descs, problems


def _listed(items: list[str]) -> list[str]:
    if len(items) <= _MAX_LISTED:
        return items
    return [*items[:_MAX_LISTED], f"... and {len(items) - _MAX_LISTED} more"]


def validate_global(descs: Sequence[ShardDesc]) -> list[str]:
    """Every problem with the union of all ranks' shards: disagreements, gaps and overlaps."""
    by_rank: dict[int, list[ShardDesc]] = defaultdict(list)
    for d in descs:
        by_rank[d.rank].append(d)
    return validate_gathered([summarize(ds, r) for r, ds in sorted(by_rank.items())]).problems


def validate_gathered(gathered: Sequence[RankShards]) -> Validated:
    """``validate_global`` on what the ranks gathered (``summarize``), keeping what the layout needs.

    Linear in the number of main replicas plus replica signatures: the usual layouts (a grid per
    key) are recognised without building boxes; anything else gets the exact check.
    """
    mains: dict[str, list[ShardDesc]] = defaultdict(list)
    replicas: dict[str, list[tuple[Signature, int]]] = defaultdict(list)
    for part in gathered:
        for d in part.mains:
            mains[d.key].append(d)
        for sig in part.replicas:
            replicas[sig[0]].append((sig, part.rank))
    out = Validated([], {}, {})
    for key in sorted(mains.keys() | replicas.keys()):
        group = mains.get(key, [])
        sigs = {(key, d.is_object, d.global_shape, d.dtype) for d in group}
        sigs.update(sig for sig, _ in replicas.get(key, ()))
        if len(sigs) > 1:
            holders = [(d.is_object, d.global_shape, d.dtype, d.rank) for d in group]
            holders += [(sig[1], sig[2], sig[3], rank) for sig, rank in replicas[key]]
            fatal, found = _disagreements(key, holders)
            out.problems += found
            if fatal:
                continue
        _, is_object, global_shape, _ = next(iter(sigs))
        out.mains[key] = group
        if is_object:
            out.problems += _object_tiling(key, global_shape, group)
            continue
        cuts = grid_cuts(global_shape, [d.offset for d in group], [d.shape for d in group])
        if cuts is None:
            out.problems += _tensor_tiling(key, global_shape, group)
        else:
            out.grids[key] = cuts
    return out


def _disagreements(key: str, holders: list[tuple[bool, tuple[int, ...], str | None, int]]) -> tuple[bool, list[str]]:
    """Messages for ranks that disagree on a key (is_object, global_shape, dtype, rank per holder);
    True when the key cannot be checked further."""
    if len({h[0] for h in holders}) > 1:
        return True, [f"{key}: used both as a ShardedTensor and as a ShardedObject"]
    shapes = sorted({h[1] for h in holders})
    if len(shapes) > 1:
        return True, [f"{key}: ranks disagree on the global shape: "
                      + "; ".join(f"{s} on ranks {sorted({h[3] for h in holders if h[1] == s})}" for s in shapes)]
    dtypes = sorted({str(h[2]) for h in holders})
    return False, [f"{key}: ranks disagree on the dtype: "
                   + "; ".join(f"{t} on ranks {sorted({h[3] for h in holders if str(h[2]) == t})}" for t in dtypes)]


def _tensor_tiling(key: str, global_shape: tuple[int, ...], mains: list[ShardDesc]) -> list[str]:
    boxes = [box_of(d.offset, d.shape) for d in mains]
    cov = coverage(box_of((0,) * len(global_shape), global_shape), boxes)
    out = [f"{key}: global shape {global_shape}: gap {fmt_box(g)} is covered by no main replica "
           "(every element needs one shard with replica_id 0)" for g in cov.gaps]
    for cell, owners in cov.overlaps:
        who = ", ".join(f"rank {mains[i].rank} (offset {mains[i].offset}, shape {mains[i].shape})" for i in owners)
        out.append(f"{key}: global shape {global_shape}: overlap {fmt_box(cell)} is written by {len(owners)} main "
                   f"replicas: {who}; give all but one a non-zero replica_id")
    return _listed(out)


def _object_tiling(key: str, global_shape: tuple[int, ...], mains: list[ShardDesc]) -> list[str]:
    seen: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for d in mains:
        seen[d.offset].append(d.rank)
    out = [f"{key}: object shard at offset {off} has {len(ranks)} main replicas (ranks {ranks}); give all but "
           "one a non-zero replica_id" for off, ranks in sorted(seen.items()) if len(ranks) > 1]
    out += [f"{key}: object shard offset {off} lies outside global shape {global_shape}"
            for off in sorted(seen) if len(off) != len(global_shape)
            or any(not 0 <= o < g for o, g in zip(off, global_shape, strict=True))]
    if math.prod(global_shape) <= 1 << 16:
        missing = [off for off in itertools.product(*(range(g) for g in global_shape)) if off not in seen]
        out += [f"{key}: object shard at offset {off} of global shape {global_shape} has no main replica"
                for off in missing]
    return _listed(out)


# ------------------------------------------------------------------------------------ load side
@dataclass
class LoadProblems:
    """What one rank found wrong with its request; merged over ranks before deciding."""

    requested: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)
    dtype: list[str] = field(default_factory=list)

    def merge(self, other: LoadProblems) -> None:
        self.requested |= other.requested
        for name in ("missing", "shape", "dtype"):
            mine = getattr(self, name)
            mine += [p for p in getattr(other, name) if p not in mine]


def check_request(
    metadata: CheckpointMetadata, leaves: Sequence[ShardedTensor | ShardedObject], path: str, allow_dtype_cast: bool,
) -> LoadProblems:
    """Compare this rank's requested leaves with the checkpoint's metadata."""
    out = LoadProblems()
    for leaf in leaves:
        out.requested.add(leaf.key)
        if isinstance(leaf, ShardedObject):
            record = metadata.objects.get(leaf.key)
            if record is None:
                out.missing.append(f"{leaf.key} (object)")
            elif not any(tuple(s.offset) == tuple(leaf.global_offset) for s in record.shards):
                out.missing.append(f"{leaf.key} (object shard at offset {tuple(leaf.global_offset)}; the "
                                   f"checkpoint holds global shape {tuple(record.global_shape)})")
            continue
        rec = metadata.tensors.get(leaf.key)
        if rec is None:
            out.missing.append(leaf.key)
            continue
        if tuple(rec.global_shape) != tuple(leaf.global_shape) and not leaf.allow_shape_mismatch:
            out.shape.append(f"{leaf.key}: model expects global shape {tuple(leaf.global_shape)}, checkpoint "
                             f"{path!r} holds {tuple(rec.global_shape)}")
        if rec.dtype != _safe_name(leaf.dtype) and not allow_dtype_cast:
            out.dtype.append(f"{leaf.key}: model expects dtype {_safe_name(leaf.dtype)}, checkpoint holds "
                             f"{rec.dtype} (pass allow_dtype_cast=True to cast)")
    return out


def _safe_name(dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except Exception:
        return str(dtype)


def decide(problems: LoadProblems, metadata: CheckpointMetadata, path: str, strict: StrictHandling) -> list[str]:
    """Raise (or warn about) every problem at once; returns the unexpected keys."""
    saved = set(metadata.tensors) | set(metadata.objects)
    unexpected = sorted(saved - problems.requested)
    missing = sorted(problems.missing)
    reported_missing = missing if strict in (StrictHandling.RAISE, StrictHandling.RAISE_MISSING) else []
    reported_unexpected = unexpected if strict is StrictHandling.RAISE else []
    key_problems = bool(reported_missing or reported_unexpected)
    if strict is StrictHandling.WARN and (missing or unexpected):
        logger.warning("loading %s: %d missing keys %s, %d unexpected keys %s", path, len(missing), missing[:20],
                       len(unexpected), unexpected[:20])
    if not (key_problems or problems.shape or problems.dtype):
        return unexpected
    sections = []
    for title, items in (("missing keys (requested, not in the checkpoint)", reported_missing),
                         ("unexpected keys (in the checkpoint, requested by no rank)", reported_unexpected),
                         ("shape mismatches", problems.shape), ("dtype mismatches", problems.dtype)):
        if items:
            sections.append(f"{len(items)} {title}:\n  " + "\n  ".join(_listed(items)))
    kinds = [bool(reported_missing), bool(reported_unexpected), bool(problems.shape), bool(problems.dtype)]
    cls: type[CheckpointMismatchError] = CheckpointMismatchError
    if sum(kinds) == 1:
        cls = [MissingKeyError, UnexpectedKeyError, ShapeMismatchError, DTypeMismatchError][kinds.index(True)]
    hint = (" (strict='raise_missing' tolerates unexpected keys; 'warn' or 'ignore' both)"
            if key_problems else "")
    raise cls(f"cannot load checkpoint {path!r}{hint}:\n" + "\n".join(sections),
              missing_keys=reported_missing, unexpected_keys=reported_unexpected,
              shape_mismatches=problems.shape, dtype_mismatches=problems.dtype)
