"""parallel_state with context parallelism: tp-cp-dp-pp rank order, CP and DP x CP groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.testing import run_distributed


def _members(group) -> list[int]:
    ranks = [torch.zeros(1) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, torch.tensor([float(dist.get_rank())]), group=group)
    return [int(r.item()) for r in ranks]


def _layout(tp: int, cp: int, pp: int) -> dict:
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)
    return {
        "tp": _members(ps.get_tensor_model_parallel_group()),
        "cp": _members(ps.get_context_parallel_group()),
        "cp_ranks": ps.get_context_parallel_global_ranks(),
        "cp_rank": (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()),
        "dp": _members(ps.get_data_parallel_group()),
        "dp_cp": _members(ps.get_data_parallel_group(with_context_parallel=True)),
        "dp_cp_rank": (ps.get_data_parallel_rank(with_context_parallel=True),
                       ps.get_data_parallel_world_size(with_context_parallel=True)),
        "pp": ps.get_pipeline_model_parallel_ranks(),
    }


def test_tp2_cp2_world4_and_cp2_dp2_world4(tmp_path):
    # rank = tp + 2 * cp: TP pairs (0,1),(2,3); CP pairs (0,2),(1,3); no data parallelism.
    out = run_distributed(_layout, 4, 2, 2, 1, tmp_dir=tmp_path)
    assert [o["tp"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["cp"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]] == [o["cp_ranks"] for o in out]
    assert [o["cp_rank"] for o in out] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert all(o["dp_cp"] == o["cp"] and o["dp_cp_rank"] == (o["cp_rank"][0], 2) for o in out)
    # rank = cp + 2 * dp: CP pairs (0,1),(2,3); DP pairs (0,2),(1,3); DP x CP all four.
    out = run_distributed(_layout, 4, 1, 2, 1, tmp_dir=tmp_path)
    assert [o["cp"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["dp"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(o["dp_cp"] == [0, 1, 2, 3] for o in out)
    assert [o["dp_cp_rank"] for o in out] == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_cp2_pp2_world4(tmp_path):
    out = run_distributed(_layout, 4, 1, 2, 2, tmp_dir=tmp_path)  # rank = cp + 2 * pp
    assert [o["cp"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["pp"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_context_parallel_needs_distributed_and_a_fitting_world():
    with pytest.raises(ps.ParallelStateError, match="context_parallel_size=2"):
        ps.initialize_model_parallel(context_parallel_size=2)
    assert ps.get_data_parallel_world_size(with_context_parallel=True) == 1
