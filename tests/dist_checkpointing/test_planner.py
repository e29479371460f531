"""Pure planning: tiling checks, chunk layout and load plans, property-tested with hypothesis."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_core.dist_checkpointing.planner import (
    ShardIndex,
    box_of,
    choose_chunk_shape,
    choose_inner_chunk_shape,
    chunk_shape_of_grid,
    chunks_of_box,
    coverage,
    grid_cuts,
    plan_reads,
)


def _split_points(size: int, draw: st.DrawFn) -> list[int]:
    """Random interior cut points of one axis (sorted, unique), as uneven shardings produce."""
    cuts = draw(st.lists(st.integers(1, max(1, size - 1)), max_size=4, unique=True)) if size > 1 else []
    return [0, *sorted(cuts), size]


@st.composite
def sharded_tensor(draw: st.DrawFn) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """A global shape and a grid sharding of it: (offset, shape) per shard."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 24)) for _ in range(ndim))
    grids = [_split_points(s, draw) for s in shape]
    shards = []
    for index in np.ndindex(*[len(g) - 1 for g in grids]):
        offset = tuple(grids[a][i] for a, i in enumerate(index))
        extent = tuple(grids[a][i + 1] - grids[a][i] for a, i in enumerate(index))
        shards.append((offset, extent))
    return shape, shards


@st.composite
def request_box(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    offset, extent = [], []
    for size in shape:
        lo = draw(st.integers(0, size - 1))
        hi = draw(st.integers(lo + 1, size))
        offset.append(lo)
        extent.append(hi - lo)
    return tuple(offset), tuple(extent)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_planned_reads_cover_request_exactly_once(data: st.DataObject) -> None:
    shape, shards = data.draw(sharded_tensor())
    offset, extent = data.draw(request_box(shape))
    plan = plan_reads(offset, extent, [box_of(o, s) for o, s in shards])
    assert plan.uncovered == []
    hits = np.zeros(extent, dtype=np.int64)
    for item in plan.items:
        # the read lies inside its shard and inside the request, at the matching place
        shard = box_of(*shards[item.shard_index])
        for (g0, g1), (s0, s1), (t0, t1), o in zip(item.global_box, shard, item.target_box, offset, strict=True):
            assert s0 <= g0 < g1 <= s1
            assert (t0, t1) == (g0 - o, g1 - o)
        hits[tuple(slice(a, b) for a, b in item.target_box)] += 1
    assert (hits == 1).all()
    assert plan.nbytes_elements == math.prod(extent)  # nothing read beyond the request


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_coverage_finds_every_gap_and_overlap(data: st.DataObject) -> None:
    shape, shards = data.draw(sharded_tensor())
    boxes = [box_of(o, s) for o, s in shards]
    region = box_of((0,) * len(shape), shape)
    assert coverage(region, boxes).gaps == [] and coverage(region, boxes).overlaps == []
    dropped = data.draw(st.integers(0, len(boxes) - 1))
    cov = coverage(region, boxes[:dropped] + boxes[dropped + 1:])
    gap_cells = sum(math.prod(b - a for a, b in g) for g in cov.gaps)
    assert gap_cells == math.prod(s for s in shards[dropped][1])
    doubled = data.draw(st.integers(0, len(boxes) - 1))
    cov = coverage(region, [*boxes, boxes[doubled]])
    assert cov.gaps == []
    assert sum(math.prod(b - a for a, b in c) for c, _ in cov.overlaps) == math.prod(shards[doubled][1])
    assert all(owners == (doubled, len(boxes)) for _, owners in cov.overlaps)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_chunk_grid_never_straddles_a_shard(data: st.DataObject) -> None:
    shape, shards = data.draw(sharded_tensor())
    boxes = [box_of(o, s) for o, s in shards]
    chunk = choose_chunk_shape(shape, boxes)
    owners: dict[tuple[int, ...], int] = {}
    for i, box in enumerate(boxes):
        for index in chunks_of_box(box, chunk):
            assert owners.setdefault(index, i) == i, "a chunk has two writers"
            lo = [ix * c for ix, c in zip(index, chunk, strict=True)]
            hi = [min(a + c, s) for a, c, s in zip(lo, chunk, shape, strict=True)]
            assert all(b0 <= a and h <= b1 for a, h, (b0, b1) in zip(lo, hi, box, strict=True))


def test_chunk_shape_is_the_shard_shape_for_even_tp_splits() -> None:
    # a [3072, 768] column-parallel weight at TP=4
    boxes = [box_of((768 * r, 0), (768, 768)) for r in range(4)]
    assert choose_chunk_shape((3072, 768), boxes) == (768, 768)
    # uneven last shard: a regular grid with a partial edge chunk
    assert choose_chunk_shape((7,), [box_of((0,), (4,)), box_of((4,), (3,))]) == (4,)


def test_inner_chunks_cut_the_split_axis_first_and_stay_small() -> None:
    inner = choose_inner_chunk_shape((1152, 768), 4, split_axes=[0])
    assert inner == (288, 768) and math.prod(inner) * 4 <= 1 << 20
    # unsplit (TP=1) weights get square-ish tiles that serve a later split on either axis
    assert choose_inner_chunk_shape((3072, 768), 4) == (384, 384)
    assert choose_inner_chunk_shape((768, 3072), 4) == (384, 384)
    # small tensors stay one chunk; prime extents are never cut
    assert choose_inner_chunk_shape((768,), 4) == (768,)
    assert choose_inner_chunk_shape((50257, 8), 4)[0] == 50257


def test_scalar_and_empty_regions() -> None:
    assert coverage((), [()]).gaps == [] and coverage((), []).gaps == [()]
    assert coverage((), [(), ()]).overlaps == [((), (0, 1))]
    assert plan_reads((0, 0), (0, 4), [box_of((0, 0), (0, 4))]).items == []


def test_grid_fast_path_never_hides_a_problem():
    from megatron_core.dist_checkpointing.planner import Coverage, _is_grid_tiling

    region = ((0, 8), (0, 6))
    grid = [((r, r + 4), (c, c + 3)) for r in (0, 4) for c in (0, 3)]
    assert _is_grid_tiling(region, grid) and coverage(region, grid) == Coverage([], [])
    duplicated = [*grid[:3], grid[0]]  # same count of boxes, one cell twice, one missing
    assert not _is_grid_tiling(region, duplicated)
    cov = coverage(region, duplicated)
    assert cov.gaps == [((4, 8), (3, 6))] and cov.overlaps == [(((0, 4), (0, 3)), (0, 3))]
    spanning = [((0, 8), (0, 3)), ((0, 4), (3, 6)), ((4, 8), (3, 6)), ((0, 4), (0, 3))]
    assert not _is_grid_tiling(region, spanning) and coverage(region, spanning).overlaps
    outside = [((0, 4), (0, 3)), ((0, 4), (3, 6)), ((4, 8), (0, 3)), ((4, 9), (3, 6))]
    assert not _is_grid_tiling(region, outside)


@st.composite
def perturbed_boxes(draw: st.DrawFn) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """A grid sharding, sometimes damaged: a shard dropped, doubled, grown, shrunk or moved."""
    shape, shards = draw(sharded_tensor())
    shards = list(shards)
    kind = draw(st.sampled_from(["none", "drop", "double", "grow", "shrink", "move", "swap_extent"]))
    i = draw(st.integers(0, len(shards) - 1))
    axis = draw(st.integers(0, len(shape) - 1))
    offset, extent = shards[i]
    bump = lambda t, d: tuple(v + d if a == axis else v for a, v in enumerate(t))  # noqa: E731
    if kind == "drop":
        del shards[i]
    elif kind == "double":
        shards.append(shards[i])
    elif kind == "grow":
        shards[i] = (offset, bump(extent, 1))
    elif kind == "shrink" and extent[axis] > 1:
        shards[i] = (offset, bump(extent, -1))
    elif kind == "move":
        shards[i] = (bump(offset, draw(st.sampled_from([-1, 1]))), extent)
    elif kind == "swap_extent" and len(shards) > 1:
        j = draw(st.integers(0, len(shards) - 1))
        shards[i], shards[j] = (offset, shards[j][1]), (shards[j][0], extent)
    return shape, shards


@settings(max_examples=400, deadline=None)
@given(case=perturbed_boxes())
def test_grid_cuts_agree_with_the_exact_coverage(case) -> None:
    """The save's fast tiling check: a grid only when the exact computation finds nothing wrong,
    and then the same chunk shape; every clean parallel layout is recognised."""
    shape, shards = case
    boxes = [box_of(o, s) for o, s in shards]
    cov = coverage(box_of((0,) * len(shape), shape), boxes)
    cuts = grid_cuts(shape, [o for o, _ in shards], [s for _, s in shards])
    if cuts is not None:
        assert cov.gaps == [] and cov.overlaps == []
        assert chunk_shape_of_grid(cuts) == choose_chunk_shape(shape, boxes)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_clean_grids_are_recognised(data: st.DataObject) -> None:
    shape, shards = data.draw(sharded_tensor())
    shards = data.draw(st.permutations(shards))
    assert grid_cuts(shape, [o for o, _ in shards], [s for _, s in shards]) is not None


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_shard_index_plans_exactly_what_a_scan_of_all_shards_plans(data: st.DataObject) -> None:
    shape, shards = data.draw(perturbed_boxes())
    shards = data.draw(st.permutations(shards))
    offset, extent = data.draw(request_box(shape))
    full = plan_reads(offset, extent, [box_of(o, s) for o, s in shards])
    indexed = ShardIndex([o for o, _ in shards], [s for _, s in shards]).plan(offset, extent)
    key = lambda item: (item.shard_index, item.global_box)  # noqa: E731
    assert sorted(indexed.items, key=key) == sorted(full.items, key=key)
    assert sorted(indexed.uncovered) == sorted(full.uncovered)
