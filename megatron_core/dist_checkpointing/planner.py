"""Pure planning on boxes: tiling checks, chunk layout, and which bytes a load must read.

Nothing here touches files or processes, so it is property-tested directly. A *box* is a tuple
of half-open ``(start, stop)`` ranges, one per axis, in global-tensor coordinates.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, int], ...]

# Inner (checksummed) chunks of about this size: small enough that a resharding load reads
# little beyond what it needs and decode buffers stay small, large enough to keep per-chunk
# overhead (index entry, crc32c, a read call) negligible. Measured in bench/checkpoint_bench.py.
DEFAULT_INNER_CHUNK_BYTES = 1 << 20
_INNER_FACTORS = (2, 3, 5, 7)


def box_of(offset: Sequence[int], shape: Sequence[int]) -> Box:
    """The box starting at ``offset`` with extent ``shape``."""
    if len(offset) != len(shape):
        raise ValueError(f"offset {tuple(offset)} and shape {tuple(shape)} differ in rank")
    start = tuple(map(int, offset))  # all in C: this runs once per shard description at scale
    return tuple(zip(start, map(operator.add, start, map(int, shape)), strict=True))


def box_volume(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap (or it is empty)."""
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    if any(start >= stop for start, stop in out):
        return None
    return out


def shift(box: Box, origin: Sequence[int]) -> Box:
    """``box`` in coordinates relative to ``origin``."""
    return tuple((start - o, stop - o) for (start, stop), o in zip(box, origin, strict=True))


def to_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


# ------------------------------------------------------------------------------------ coverage
@dataclass(frozen=True)
class Coverage:
    """How a set of boxes covers a region: the parts covered by none, and by more than one."""

    gaps: list[Box]
    overlaps: list[tuple[Box, tuple[int, ...]]]  # (cell, indices of the boxes covering it)


def coverage(region: Box, boxes: Sequence[Box]) -> Coverage:
    """Find the gaps and overlaps of ``boxes`` inside ``region`` (exact, by coordinate compression).

    Cuts ``region`` along every box boundary into cells; each cell is covered by a fixed set of
    boxes. Adjacent gap cells along the last axis are merged to keep reports short.
    """
    if any(start >= stop for start, stop in region):
        return Coverage([], [])
    if not region:  # a scalar: one cell
        owners = tuple(range(len(boxes)))
        return Coverage([] if boxes else [()], [((), owners)] if len(boxes) > 1 else [])
    if _is_grid_tiling(region, boxes):  # the usual case, in O(boxes): nothing to report
        return Coverage([], [])
    cuts = []
    for axis, (lo, hi) in enumerate(region):
        points = {lo, hi}
        for box in boxes:
            points.update(p for p in box[axis] if lo < p < hi)
        cuts.append(sorted(points))
    counts = np.zeros([len(c) - 1 for c in cuts], dtype=np.int64)
    clipped = [intersect(region, box) for box in boxes]
    for part in clipped:
        if part is not None:
            index = tuple(slice(c.index(start), c.index(stop)) for c, (start, stop) in zip(cuts, part, strict=True))
            counts[index] += 1

    def cell(idx: tuple[int, ...]) -> Box:
        return tuple((c[i], c[i + 1]) for c, i in zip(cuts, idx, strict=True))

    gaps: list[Box] = []
    for idx in zip(*np.nonzero(counts == 0), strict=True):
        b = cell(tuple(int(i) for i in idx))
        last = gaps[-1] if gaps else None
        if last is not None and last[:-1] == b[:-1] and last[-1][1] == b[-1][0]:
            gaps[-1] = b[:-1] + ((last[-1][0], b[-1][1]),)
        else:
            gaps.append(b)
    overlaps = []
    for idx in zip(*np.nonzero(counts > 1), strict=True):
        b = cell(tuple(int(i) for i in idx))
        owners = tuple(i for i, c in enumerate(clipped) if c is not None and intersect(c, b) is not None)
        overlaps.append((b, owners))
    return Coverage(gaps, overlaps)


def _is_grid_tiling(region: Box, boxes: Sequence[Box]) -> bool:
    """Whether ``boxes`` are exactly the cells of one grid over ``region``, each once.

    True implies no gaps and no overlaps. False says nothing (the exact computation decides):
    it only lets the common case (shards of a parallel layout) skip that computation.
    """
    cuts = [sorted({p for box in boxes for p in box[axis]} | {lo, hi}) for axis, (lo, hi) in enumerate(region)]
    if any(c[0] != lo or c[-1] != hi for c, (lo, hi) in zip(cuts, region, strict=True)):
        return False  # something sticks out of the region
    if len(boxes) != math.prod(len(c) - 1 for c in cuts):
        return False
    where = [{p: i for i, p in enumerate(c)} for c in cuts]
    cells = set()
    for box in boxes:
        cell = []
        for (start, stop), w in zip(box, where, strict=True):
            i = w[start]
            if w[stop] != i + 1:
                return False  # spans several cells
            cell.append(i)
        cells.add(tuple(cell))
    return len(cells) == len(boxes)


# ------------------------------------------------------------------------------------ layout
def grid_cuts(global_shape: Sequence[int], offsets: Sequence[Sequence[int]], shapes: Sequence[Sequence[int]]
              ) -> list[list[int]] | None:
    """The cut points of each axis when the boxes ``(offsets[i], shapes[i])`` are exactly the cells of
    one grid over ``[0, global_shape)``, each once (so: no gap, no overlap); else None (which says
    nothing: ``coverage`` decides). The save's validation of the usual parallel layouts, without
    building a box per shard: a few C-level passes per axis.
    """
    n = len(offsets)
    if n == 0 or any(g <= 0 for g in global_shape):
        return None
    cuts_per_axis, cells = [], []
    for axis, size in enumerate(global_shape):
        starts = [o[axis] for o in offsets]
        cuts = sorted(set(starts))
        if cuts[0] != 0 or cuts[-1] >= size:
            return None
        cuts.append(size)
        where = {p: i for i, p in enumerate(cuts)}
        index = list(map(where.__getitem__, starts))
        extents = [s[axis] for s in shapes]
        if list(map(operator.add, starts, extents)) != [cuts[i + 1] for i in index]:
            return None  # a box ends between cuts (spans several cells, or sticks out)
        cuts_per_axis.append(cuts)
        cells.append(index)
    if n != math.prod(len(c) - 1 for c in cuts_per_axis) or len(set(zip(*cells, strict=True))) != n:
        return None
    return cuts_per_axis


def chunk_shape_of_grid(cuts_per_axis: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """``choose_chunk_shape`` for the boxes of a grid (``grid_cuts``): the gcd of the interior cuts."""
    return tuple(max(1, math.gcd(*cuts[1:-1])) if len(cuts) > 2 else cuts[-1] for cuts in cuts_per_axis)


def choose_chunk_shape(global_shape: Sequence[int], boxes: Sequence[Box]) -> tuple[int, ...]:
    """The largest regular chunk grid in which every shard boundary is a chunk boundary.

    With equal shards (the tensor-parallel case) this is the shard shape, so each written shard
    is exactly one chunk file and every chunk has exactly one writer.
    """
    chunk = []
    for axis, size in enumerate(global_shape):
        interior = {p for box in boxes for p in box[axis] if 0 < p < size}
        chunk.append(max(1, math.gcd(*interior) if interior else size))
    return tuple(chunk)


def choose_inner_chunk_shape(
    chunk_shape: Sequence[int],
    itemsize: int,
    split_axes: Sequence[int] = (),
    target_bytes: int = DEFAULT_INNER_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Cut a chunk into checksummed inner chunks of at most about ``target_bytes``.

    Axes the tensor is already split along (``split_axes``) are cut first, since a load at another
    parallel size cuts them again; otherwise the longest axis is cut, giving square-ish tiles that
    serve a later split along any axis. Only small factors are used so that inner boundaries land
    on the boundaries other parallel sizes produce; an axis with no such factor is left whole.
    """
    inner = [int(s) for s in chunk_shape]

    def factor(extent: int) -> int | None:
        return next((f for f in _INNER_FACTORS if extent % f == 0 and extent > f), None)

    while math.prod(inner) * itemsize > target_bytes:
        candidates = [a for a in range(len(inner)) if factor(inner[a]) is not None]
        if not candidates:
            break
        preferred = [a for a in candidates if a in split_axes] or candidates
        axis = max(preferred, key=lambda a: inner[a])
        inner[axis] //= factor(inner[axis]) or 1
    return tuple(inner)


def chunks_of_box(box: Box, chunk_shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Grid indices of the chunks a (non-empty) box touches."""
    ranges = [range(start // c, (stop - 1) // c + 1) for (start, stop), c in zip(box, chunk_shape, strict=True)]
    return itertools.product(*ranges)


# ------------------------------------------------------------------------------------ load plan
@dataclass(frozen=True)
class ReadItem:
    """Read ``global_box`` (part of saved shard ``shard_index``) into ``target_box`` of the request."""

    shard_index: int
    global_box: Box
    target_box: Box


@dataclass(frozen=True)
class ReadPlan:
    items: list[ReadItem]
    uncovered: list[Box]  # parts of the request no saved shard holds (global coordinates)

    @property
    def nbytes_elements(self) -> int:
        return sum(box_volume(item.global_box) for item in self.items)


def plan_reads(request_offset: Sequence[int], request_shape: Sequence[int],
               shards: Sequence[Box]) -> ReadPlan:
    """Which parts of which saved shards fill the requested box.

    Args:
        request_offset: global offset of the requested (local) tensor.
        request_shape: its shape (with prepended axes as size 1).
        shards: boxes of the saved shards (they tile the global tensor exactly once).

    Returns:
        One ``ReadItem`` per shard overlapping the request, with the overlap in global
        coordinates and relative to the request; plus any part of the request left uncovered.
    """
    request = box_of(request_offset, request_shape)
    if box_volume(request) == 0:
        return ReadPlan([], [])
    items = []
    for index, shard in enumerate(shards):
        overlap = []  # intersect(), inlined with an early exit: this loop runs over every stored shard
        for (a0, a1), (b0, b1) in zip(request, shard, strict=True):
            lo, hi = (a0 if a0 > b0 else b0), (a1 if a1 < b1 else b1)
            if lo >= hi:
                break
            overlap.append((lo, hi))
        else:
            box = tuple(overlap)
            items.append(ReadItem(index, box, shift(box, request_offset)))
    if len(items) == 1 and items[0].global_box == request:  # the saving layout: nothing to compute
        return ReadPlan(items, [])
    uncovered = coverage(request, [item.global_box for item in items]).gaps
    return ReadPlan(items, uncovered)


class ShardIndex:
    """The stored shards of one key, sorted along the first axis, so that a load plan looks only at
    the shards whose first-axis range can meet the request (a binary search) instead of all of
    them: at thousands of ranks a key holds hundreds of shards and a rank needs a few.

    ``plan`` gives the same result as ``plan_reads`` over all shards (``shard_index`` refers to the
    position in ``offsets``/``shapes``).
    """

    def __init__(self, offsets: Sequence[Sequence[int]], shapes: Sequence[Sequence[int]]) -> None:
        self.offsets, self.shapes = offsets, shapes
        self.ndim = len(offsets[0]) if offsets else 0
        if self.ndim == 0:
            self.order, self.starts, self.max_extent = list(range(len(offsets))), [], 0
            return
        starts = [o[0] for o in offsets]
        self.order = sorted(range(len(offsets)), key=starts.__getitem__)
        self.starts = [starts[i] for i in self.order]
        self.max_extent = max(s[0] for s in shapes)

    def plan(self, request_offset: Sequence[int], request_shape: Sequence[int]) -> ReadPlan:
        candidates = self.order
        if self.ndim and len(request_offset) == self.ndim:
            start, stop = int(request_offset[0]), int(request_offset[0]) + int(request_shape[0])
            # a shard meets [start, stop) on axis 0 iff its start < stop and start + extent > start
            lo = bisect.bisect_right(self.starts, start - self.max_extent)
            candidates = self.order[lo:bisect.bisect_left(self.starts, stop)]
        plan = plan_reads(request_offset, request_shape,
                          [box_of(self.offsets[i], self.shapes[i]) for i in candidates])
        items = [ReadItem(candidates[item.shard_index], item.global_box, item.target_box) for item in plan.items]
        return ReadPlan(items, plan.uncovered)
