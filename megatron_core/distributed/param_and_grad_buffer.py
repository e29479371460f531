"""Contiguous gradient (and parameter) buffers cut into buckets: the unit of data-parallel communication.

One :class:`ParamAndGradBuffer` per parameter dtype of a model chunk. Its parameters, in the order
backward produces their gradients (reverse registration order), are laid out back to back in one
flat gradient tensor; each parameter's ``main_grad`` is a view of its slice, so accumulating over
micro-batches and reducing a whole bucket need no copies. Consecutive parameters form a
:class:`Bucket` of about ``bucket_size`` elements; one collective reduces one bucket.

With the distributed optimizer every bucket is padded to a multiple of the data-parallel size
``d`` and data-parallel rank ``r`` owns elements ``[r * n / d, (r + 1) * n / d)`` of each bucket
of ``n`` elements: gradients are reduce-scattered (each rank receives the sum of its shard only,
half the traffic of an all-reduce) and the parameters live in a flat parameter buffer of the same
layout (``param.data`` is a view of it), into which the updated shards are all-gathered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_core import parallel_state


@dataclass(eq=False)
class Bucket:
    """A run of consecutive parameters reduced (and, sharded, gathered) by one collective.

    ``late`` buckets hold gradients that other groups must sum first (tensor-parallel partial
    gradients, the tied embedding across pipeline stages): they are reduced only in
    ``finish_grad_sync``, after those sums.
    """

    index: int
    params: list[torch.nn.Parameter]
    offset: int  # first element in the buffer
    numel: int  # elements, padding included
    grad_data: torch.Tensor  # view of the gradient buffer
    param_data: torch.Tensor | None  # view of the parameter buffer (distributed optimizer only)
    late: bool = False
    ready: set[int] = field(default_factory=set)  # ids of parameters whose final gradient arrived
    grad_handle: dist.Work | None = None
    grad_reduced: bool = False
    gather_handle: dist.Work | None = None


class ParamAndGradBuffer:
    """The flat gradient buffer (and parameter buffer when sharded) of one dtype's parameters.

    Args:
        params: the parameters, in the order their gradients become final in backward.
        late: ids of the parameters whose buckets are reduced only after the cross-group sums.
        grad_dtype: dtype of the accumulated and reduced gradients.
        bucket_size: elements per bucket (a larger parameter gets a bucket of its own).
        data_parallel_group: the group gradients are summed over (the expert-data-parallel group for
            experts' parameters).
        shard: lay out for the distributed optimizer (padded buckets, flat parameter buffer).
        scale: gradients are multiplied by it before the sum (1 / data-parallel size: the mean).
        expert: the parameters are MoE experts' (``allreduce = False``).
    """

    def __init__(self, params: list[torch.nn.Parameter], late: set[int], grad_dtype: torch.dtype, bucket_size: int,
                 data_parallel_group: dist.ProcessGroup | None, shard: bool, scale: float = 1.0,
                 expert: bool = False) -> None:
        self.params = params
        self.scale = scale
        self.expert = expert
        self.param_dtype = params[0].dtype
        self.grad_dtype = grad_dtype
        self.group = data_parallel_group
        self.dp_size = parallel_state.group_world_size(data_parallel_group)
        self.dp_rank = parallel_state.group_rank(data_parallel_group)
        self.shard = shard
        device = params[0].device
        self.ranges: dict[int, tuple[int, int]] = {}
        groups = _group(params, late, bucket_size)
        layout: list[tuple[list[torch.nn.Parameter], int, int, bool]] = []
        offset = 0
        for bucket_params, is_late in groups:
            start = offset
            for p in bucket_params:
                self.ranges[id(p)] = (offset, offset + p.numel())
                offset += p.numel()
            numel = offset - start
            if shard:
                numel = -(-numel // self.dp_size) * self.dp_size  # pad: every rank owns an equal shard
            offset = start + numel
            layout.append((bucket_params, start, numel, is_late))
        self.numel = offset
        self.grad_data = torch.zeros(offset, dtype=grad_dtype, device=device)
        self.param_data = torch.zeros(offset, dtype=self.param_dtype, device=device) if shard else None
        self.buckets: list[Bucket] = []
        for i, (bucket_params, start, numel, is_late) in enumerate(layout):
            param_view = self.param_data[start:start + numel] if self.param_data is not None else None
            self.buckets.append(Bucket(i, bucket_params, start, numel, self.grad_data[start:start + numel],
                                       param_view, is_late))
        self.bucket_of: dict[int, Bucket] = {id(p): b for b in self.buckets for p in b.params}
        for p in params:
            lo, hi = self.ranges[id(p)]
            if self.param_data is not None:
                # The parameter now lives in the flat buffer the updated shards are gathered into.
                self.param_data[lo:hi].copy_(p.data.reshape(-1))
                p.data = self.param_data[lo:hi].view(p.shape)
            p.main_grad = self.grad_data[lo:hi].view(p.shape)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ shards
    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """Buffer elements ``[lo, hi)`` of ``bucket`` this data-parallel rank owns (all of it unsharded)."""
        if not self.shard:
            return bucket.offset, bucket.offset + bucket.numel
        size = bucket.numel // self.dp_size
        lo = bucket.offset + self.dp_rank * size
        return lo, lo + size

    # ------------------------------------------------------------------ gradients
    def start_grad_sync(self, bucket: Bucket) -> None:
        """Launch the bucket's asynchronous reduction (average over the data-parallel group)."""
        if bucket.grad_handle is not None or bucket.grad_reduced:
            return
        if self.scale != 1.0:
            # A sum of pre-scaled gradients: the average over replicas (gloo has no AVG).
            bucket.grad_data.mul_(self.scale)
        if self.dp_size == 1:
            bucket.grad_reduced = True
            return
        if self.shard:
            lo, hi = self.shard_range(bucket)
            out = self.grad_data[lo:hi]
            bucket.grad_handle = dist.reduce_scatter_single(out, bucket.grad_data, group=self.group, async_op=True)
        else:
            bucket.grad_handle = dist.all_reduce(bucket.grad_data, group=self.group, async_op=True)

    def finish_grad_sync(self, bucket: Bucket) -> None:
        """Wait for the bucket's reduction (launching it first if it was not)."""
        self.start_grad_sync(bucket)
        if bucket.grad_handle is not None:
            bucket.grad_handle.wait()
            bucket.grad_handle = None
        bucket.grad_reduced = True

    def reset(self, zero: bool) -> None:
        """Forget this step's reductions; ``zero``: clear the accumulated gradients too."""
        for bucket in self.buckets:
            if bucket.grad_handle is not None:
                bucket.grad_handle.wait()
            bucket.grad_handle, bucket.grad_reduced = None, False
            bucket.ready.clear()
        if zero:
            self.grad_data.zero_()

    # ------------------------------------------------------------------ parameters (sharded only)
    def start_param_sync(self, bucket: Bucket) -> None:
        """Launch the all-gather of every rank's updated shard of ``bucket`` into the parameter buffer."""
        if bucket.param_data is None or self.dp_size == 1 or bucket.gather_handle is not None:
            return
        lo, hi = self.shard_range(bucket)
        bucket.gather_handle = dist.all_gather_single(bucket.param_data, self.param_data[lo:hi],  # type: ignore[index]
                                                      group=self.group, async_op=True)

    def finish_param_sync(self, bucket: Bucket) -> None:
        if bucket.gather_handle is not None:
            bucket.gather_handle.wait()
            bucket.gather_handle = None


def _group(params: list[torch.nn.Parameter], late: set[int], bucket_size: int
           ) -> list[tuple[list[torch.nn.Parameter], bool]]:
    """Consecutive runs of at most ``bucket_size`` elements (or one parameter); late parameters last, apart."""
    groups: list[tuple[list[torch.nn.Parameter], bool]] = []
    for is_late in (False, True):
        current: list[torch.nn.Parameter] = []
        filled = 0
        for p in params:
            if (id(p) in late) != is_late:
                continue
            if current and filled + p.numel() > bucket_size:
                groups.append((current, is_late))
                current, filled = [], 0
            current.append(p)
            filled += p.numel()
        if current:
            groups.append((current, is_late))
    return groups
