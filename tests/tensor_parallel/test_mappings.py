"""Autograd collectives: forward values and backward gradients on real gloo groups."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.tensor_parallel import (
    all_gather_last_dim_from_tensor_parallel_region,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_core.testing import run_distributed

ALL = [
    copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
    all_gather_last_dim_from_tensor_parallel_region, scatter_to_sequence_parallel_region,
    gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region,
]


def _fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fn(x, **kwargs)
    y.backward(grad)
    return y.detach(), x.grad


def _check_group(group, world: int, rank: int) -> None:
    """Every mapping on ``group`` (None = parallel_state's TP group) against hand-computed values."""
    kw = {} if group is None else {"group": group}
    full = torch.arange(4.0 * world * 3).view(4 * world, 3)  # [s, h] with s = 4 * world
    mine_rows = full.chunk(world, 0)[rank]
    mine_cols = full.t().contiguous().chunk(world, 1)[rank]  # [3, 4]: a slice of [3, 4 * world]
    r1 = float(rank + 1)
    total = world * (world + 1) / 2  # sum over ranks of (rank + 1)

    y, g = _fwd_bwd(copy_to_tensor_model_parallel_region, full, full * r1, **kw)
    assert torch.equal(y, full) and torch.equal(g, full * total)
    y, g = _fwd_bwd(reduce_from_tensor_model_parallel_region, full * r1, full, **kw)
    assert torch.equal(y, full * total) and torch.equal(g, full)

    wide = full.t().contiguous()  # [3, 4 * world]
    y, g = _fwd_bwd(scatter_to_tensor_model_parallel_region, wide, mine_cols, **kw)
    assert torch.equal(y, mine_cols) and torch.equal(g, wide)
    for gather in (gather_from_tensor_model_parallel_region, all_gather_last_dim_from_tensor_parallel_region):
        y, g = _fwd_bwd(gather, mine_cols, wide * r1, **kw)
        assert torch.equal(y, wide) and torch.equal(g, mine_cols * r1)

    y, g = _fwd_bwd(scatter_to_sequence_parallel_region, full, mine_rows, **kw)
    assert torch.equal(y, mine_rows) and torch.equal(g, full)
    y, g = _fwd_bwd(gather_from_sequence_parallel_region, mine_rows, full * r1, **kw)
    assert torch.equal(y, full) and torch.equal(g, mine_rows * total)  # reduce-scattered grads
    y, g = _fwd_bwd(gather_from_sequence_parallel_region, mine_rows, full * r1, tensor_parallel_output_grad=False,
                    **kw)
    assert torch.equal(y, full) and torch.equal(g, mine_rows * r1)  # just this rank's slice
    y, g = _fwd_bwd(reduce_scatter_to_sequence_parallel_region, full * r1, mine_rows, **kw)
    assert torch.equal(y, mine_rows * total) and torch.equal(g, full)


def _on_rank() -> bool:
    ps.initialize_model_parallel(2)  # TP groups {0, 1} and {2, 3}
    _check_group(None, 2, ps.get_tensor_model_parallel_rank())
    _check_group(dist.group.WORLD, 4, dist.get_rank())  # an explicit group wins over parallel_state
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1)  # a real group of size 1: every mapping is the identity
    x = torch.ones(4, 4)
    return all(fn(x) is x for fn in ALL)


def test_mappings_forward_and_backward(tmp_path):
    assert run_distributed(_on_rank, 4, tmp_dir=tmp_path) == [True] * 4


def test_without_distributed_every_mapping_is_identity():
    x = torch.randn(4, 6, requires_grad=True)
    for fn in ALL:
        assert fn(x) is x
