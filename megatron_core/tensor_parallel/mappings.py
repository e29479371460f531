"""Autograd-aware collectives over the tensor-parallel group.

Every function takes ``group=None``, meaning ``parallel_state.get_tensor_model_parallel_group()``,
and is the identity when that group has size 1 (or is ``None``: no torch.distributed). Each
forward collective is paired with its adjoint in backward:

=============================================  ======================  ======================
function                                       forward                 backward
=============================================  ======================  ======================
copy_to_tensor_model_parallel_region           identity                all-reduce
reduce_from_tensor_model_parallel_region       all-reduce              identity
scatter_to_tensor_model_parallel_region        split last dim          all-gather last dim
gather_from_tensor_model_parallel_region       all-gather last dim     split last dim
scatter_to_sequence_parallel_region            split first dim         all-gather first dim
gather_from_sequence_parallel_region           all-gather first dim    reduce-scatter first dim
reduce_scatter_to_sequence_parallel_region     reduce-scatter first    all-gather first dim
=============================================  ======================  ======================

The same code runs on gloo (CPU) and NCCL (GPU): single-tensor collectives are used where the
backend has them, list-based ones otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.tensor_parallel.utils import divide, split_tensor_along_dim

# Backends (by name) on which a single-tensor collective failed once; they use list collectives.
_NO_SINGLE_TENSOR_OPS: set[str] = set()

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _resolve(group: ProcessGroup | None) -> ProcessGroup | None:
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _size(group: ProcessGroup | None) -> int:
    return parallel_state.group_world_size(group)


def _backend(group: ProcessGroup) -> str:
    return str(dist.get_backend(group))


# ----------------------------------------------------------------------------- raw collectives
def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if _size(group) == 1:
        return x
    out = x.contiguous().clone()  # never reduce in place into a tensor autograd may still need
    dist.all_reduce(out, group=group)
    return out


def _gather_first_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...], rank order."""
    world = _size(group)
    if world == 1:
        return x
    assert group is not None
    x = x.contiguous()
    out = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
    backend = _backend(group)
    if backend not in _NO_SINGLE_TENSOR_OPS:
        try:
            _all_gather_single(out, x, group=group)
            return out
        except (RuntimeError, NotImplementedError, ValueError):
            _NO_SINGLE_TENSOR_OPS.add(backend)
    dist.all_gather(list(out.chunk(world, dim=0)), x, group=group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[world * n, ...] on each rank -> this rank's [n, ...] of the sum over ranks."""
    world = _size(group)
    if world == 1:
        return x
    assert group is not None
    x = x.contiguous()
    rows = divide(x.size(0), world, "first dimension of the reduce-scattered tensor")
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    backend = _backend(group)
    if backend not in _NO_SINGLE_TENSOR_OPS:
        try:
            _reduce_scatter_single(out, x, group=group)
            return out
        except (RuntimeError, NotImplementedError, ValueError):
            _NO_SINGLE_TENSOR_OPS.add(backend)
    try:
        dist.reduce_scatter(out, [c.contiguous() for c in x.chunk(world, dim=0)], group=group)
    except (RuntimeError, NotImplementedError, ValueError):
        # Oldest fallback: every backend can all-reduce; keep our slice.
        full = x.clone()
        dist.all_reduce(full, group=group)
        out = full.narrow(0, dist.get_rank(group) * rows, rows).contiguous()
    return out


def _gather_last_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[..., n] on each rank -> [..., world * n]."""
    world = _size(group)
    if world == 1:
        return x
    last = x.dim() - 1
    # Gather along dim 0 (contiguous pieces), then move the rank axis next to the last dim.
    stacked = _gather_first_dim(x.movedim(last, 0), group)  # [world * n, ...]
    return stacked.movedim(0, last).contiguous()


def _split_last_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    return split_tensor_along_dim(x, world, dist.get_rank(group), dim=x.dim() - 1)


def _split_first_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    return split_tensor_along_dim(x, world, dist.get_rank(group), dim=0)


# ----------------------------------------------------------------------------- autograd functions
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last_dim(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_last_dim(grad, ctx.group), None


class _ScatterFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _split_first_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_first_dim(grad, ctx.group), None


class _GatherFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: ProcessGroup | None, tensor_parallel_output_grad: bool
    ) -> torch.Tensor:
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # A gathered tensor consumed by TP-split computation gets a partial gradient on each rank
        # (sum them); one consumed by replicated computation has the full gradient already.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first_dim(grad, ctx.group), None, None
        return _split_first_dim(grad, ctx.group), None, None


class _ReduceScatterFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_first_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_first_dim(grad, ctx.group), None


# ----------------------------------------------------------------------------- public API
def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Forward identity, backward all-reduce: the input of a column-parallel matmul."""
    group = _resolve(group)
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Forward all-reduce (sum), backward identity: the output of a row-parallel matmul."""
    group = _resolve(group)
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Keep this rank's slice of the last dim ``[..., h] -> [..., h/tp]``; backward all-gathers."""
    group = _resolve(group)
    return x if _size(group) == 1 else _ScatterLastDim.apply(x, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """All-gather the last dim ``[..., h/tp] -> [..., h]``; backward keeps this rank's slice."""
    group = _resolve(group)
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)


def all_gather_last_dim_from_tensor_parallel_region(
    x: torch.Tensor, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Alias of ``gather_from_tensor_model_parallel_region`` (Megatron-Core name)."""
    return gather_from_tensor_model_parallel_region(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Keep this rank's slice of the first (sequence) dim ``[s, ...] -> [s/tp, ...]``."""
    group = _resolve(group)
    return x if _size(group) == 1 else _ScatterFirstDim.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, tensor_parallel_output_grad: bool = True, group: ProcessGroup | None = None
) -> torch.Tensor:
    """All-gather the first (sequence) dim ``[s/tp, ...] -> [s, ...]``.

    Args:
        x: this rank's sequence chunk.
        tensor_parallel_output_grad: the gathered tensor feeds TP-split computation, so backward
            reduce-scatters the partial gradients; False: backward just keeps this rank's slice.
        group: the group; None for the tensor-parallel group.
    """
    group = _resolve(group)
    return x if _size(group) == 1 else _GatherFirstDim.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum over ranks and keep this rank's sequence chunk ``[s, ...] -> [s/tp, ...]``."""
    group = _resolve(group)
    return x if _size(group) == 1 else _ReduceScatterFirstDim.apply(x, group)
