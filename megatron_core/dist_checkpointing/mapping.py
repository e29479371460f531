"""What a sharded state dict is made of: where every local slice lives in its global tensor.

A module's ``sharded_state_dict()`` returns a (nested) dict whose leaves are:

* ``ShardedTensor``: a local tensor plus its key, global shape and offset, and a replica id
  (all zeros = the main replica, the one copy that is written);
* ``ShardedObject``: any picklable/JSON-able object, per rank or replicated;
* ``ShardedTensorFactory``: a tensor stored differently from how it lives in memory (e.g. the
  gated MLP's fc1, saved as two matrices), with the functions to split it for saving and to merge
  it back after loading.

Storage lives in ``serialization.py``; this file only describes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

ReplicaId = int | tuple[int, ...]
# (axis, rank offset along that axis, number of fragments along that axis)
RankOffset = tuple[int, int, int]


class ShardingError(ValueError):
    """A sharded tensor's description is inconsistent (shapes, offsets, fragments)."""


def is_main_replica(replica_id: ReplicaId) -> bool:
    """The one copy that is written: every component of the replica id is zero."""
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


@dataclass
class ShardedTensor:
    """A local tensor and where it sits in the global tensor stored under ``key``.

    Attributes:
        key: the checkpoint key (one stored array per key).
        data: the local tensor (None when only describing what to load).
        dtype: dtype of the stored tensor.
        local_shape: shape of ``data``.
        global_shape: shape of the whole tensor across all ranks.
        global_offset: index of ``data[0, 0, ...]`` in the global tensor.
        axis_fragmentations: how many pieces each global axis is cut into (the shard grid).
        replica_id: 0 / all-zero tuple for the main replica; other ids are copies not written.
        prepend_axis_num: leading global axes that ``data`` lacks (size 1 locally), e.g. stacking.
        allow_shape_mismatch: load the stored tensor even if its shape differs (e.g. padded vocab).
    """

    key: str
    data: torch.Tensor | None
    dtype: torch.dtype
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    axis_fragmentations: tuple[int, ...] | None
    replica_id: ReplicaId = 0
    prepend_axis_num: int = 0
    allow_shape_mismatch: bool = False

    def __post_init__(self) -> None:
        self.local_shape = tuple(int(s) for s in self.local_shape)
        self.global_shape = tuple(int(s) for s in self.global_shape)
        self.global_offset = tuple(int(s) for s in self.global_offset)
        if len(self.global_shape) != len(self.global_offset):
            raise ShardingError(
                f"{self.key}: global_shape {self.global_shape} and global_offset {self.global_offset} "
                "have different ranks"
            )
        if len(self.local_shape) + self.prepend_axis_num != len(self.global_shape):
            raise ShardingError(
                f"{self.key}: local_shape {self.local_shape} plus {self.prepend_axis_num} prepended axes does "
                f"not match global_shape {self.global_shape}"
            )
        for axis, (off, loc, glob) in enumerate(zip(self.global_offset, self.full_local_shape, self.global_shape,
                                                    strict=True)):
            if off < 0 or off + loc > glob:
                raise ShardingError(
                    f"{self.key}: axis {axis} slice [{off}, {off + loc}) lies outside global size {glob}"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rank_offsets(
        cls,
        key: str,
        data: torch.Tensor,
        *rank_offsets: RankOffset,
        replica_id: ReplicaId = 0,
        prepend_axis_num: int = 0,
        allow_shape_mismatch: bool = False,
    ) -> ShardedTensor:
        """Describe ``data`` as fragment ``rank`` of ``num_fragments`` along each given axis.

        Axes are numbered in the global tensor: axes below ``prepend_axis_num`` are prepended
        (``data`` does not have them); axis ``prepend_axis_num + i`` is ``data``'s axis ``i``.

        Example: a column-parallel weight on TP rank 1 of 4 is
        ``ShardedTensor.from_rank_offsets("w", w, (0, 1, 4))``.
        """
        ndim = data.ndim + prepend_axis_num
        global_shape = [1] * prepend_axis_num + list(data.shape)
        global_offset = [0] * ndim
        fragments = [1] * ndim
        seen: set[int] = set()
        for axis, rank, num_fragments in rank_offsets:
            if not 0 <= axis < ndim:
                raise ShardingError(f"{key}: axis {axis} out of range for a {ndim}-d global tensor")
            if axis in seen:
                raise ShardingError(f"{key}: axis {axis} given twice in rank_offsets {rank_offsets}")
            if not 0 <= rank < num_fragments:
                raise ShardingError(f"{key}: rank {rank} not in [0, {num_fragments}) on axis {axis}")
            seen.add(axis)
            local = global_shape[axis]
            global_shape[axis] = local * num_fragments
            global_offset[axis] = local * rank
            fragments[axis] = num_fragments
        return cls(
            key=key,
            data=data,
            dtype=data.dtype,
            local_shape=tuple(data.shape),
            global_shape=tuple(global_shape),
            global_offset=tuple(global_offset),
            axis_fragmentations=tuple(fragments),
            replica_id=replica_id,
            prepend_axis_num=prepend_axis_num,
            allow_shape_mismatch=allow_shape_mismatch,
        )

    # ------------------------------------------------------------------ views
    @property
    def full_local_shape(self) -> tuple[int, ...]:
        """The local shape in global rank (prepended axes have size 1)."""
        return (1,) * self.prepend_axis_num + tuple(self.local_shape)

    def global_slice(self) -> tuple[slice, ...]:
        """The box this shard covers in the global tensor."""
        return tuple(slice(off, off + size) for off, size in zip(self.global_offset, self.full_local_shape,
                                                                    strict=True))

    @property
    def is_main_replica(self) -> bool:
        return is_main_replica(self.replica_id)

    def without_data(self) -> ShardedTensor:
        return replace(self, data=None)

    def __repr__(self) -> str:
        return (
            f"ShardedTensor(key={self.key!r}, dtype={self.dtype}, local_shape={self.local_shape}, "
            f"global_shape={self.global_shape}, global_offset={self.global_offset}, "
            f"replica_id={self.replica_id})"
        )


@dataclass
class ShardedObject:
    """A non-tensor object in a sharded state dict.

    A replicated object has ``global_shape=(1,)``, ``global_offset=(0,)``; a per-rank object uses
    e.g. ``global_shape=(world,)``, ``global_offset=(rank,)``. Only main replicas are written.
    """

    key: str
    data: Any
    global_shape: tuple[int, ...] = (1,)
    global_offset: tuple[int, ...] = (0,)
    replica_id: ReplicaId = 0

    @property
    def unique_key(self) -> str:
        """Storage name: the key plus the shard position, so per-rank objects do not collide."""
        offset = ".".join(str(o) for o in self.global_offset)
        shape = ".".join(str(s) for s in self.global_shape)
        return f"{self.key}/shard_{offset}_{shape}"

    @property
    def is_main_replica(self) -> bool:
        return is_main_replica(self.replica_id)


@dataclass
class ShardedTensorFactory:
    """A tensor saved in another form than it is held in memory.

    ``build_fn(key, data, replica_id)`` returns the sharded sub-state-dict actually stored (e.g.
    two ``ShardedTensor``s for a concatenated gate/up matrix); ``merge_fn(loaded_sub_state_dict)``
    turns what was loaded back into the in-memory tensor.
    """

    key: str
    data: torch.Tensor
    build_fn: Callable[[str, torch.Tensor, ReplicaId], Any]
    merge_fn: Callable[[Any], torch.Tensor]
    replica_id: ReplicaId = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        return self.build_fn(self.key, self.data, self.replica_id)


ShardedStateDict = dict[str, Any]
