"""parallel_state at world sizes 1, 2 and 4 on real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.testing import DistributedTestError, run_distributed


def _layout(tp: int, pp: int) -> dict:
    ps.initialize_model_parallel(tp, pp)
    # The TP group really reduces over its members only.
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return {
        "rank": dist.get_rank(),
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        "first": ps.is_pipeline_first_stage(),
        "last": ps.is_pipeline_last_stage(),
        "tp_sum": t.item(),
        "pp_ranks": ps.get_pipeline_model_parallel_ranks(),
    }


def test_single_process_default_needs_no_launcher():
    ps.initialize_model_parallel()
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_data_parallel_world_size() == 1
    assert ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()
    assert ps.get_tensor_model_parallel_group() is None


def test_sizes_above_one_without_distributed_fail_clearly():
    with pytest.raises(ps.ParallelStateError, match="torchrun"):
        ps.initialize_model_parallel(tensor_model_parallel_size=2)


def test_world_2_tp2(tmp_path):
    out = run_distributed(_layout, 2, 2, 1, tmp_dir=tmp_path)
    assert [o["tp"] for o in out] == [(0, 2), (1, 2)]
    assert all(o["dp"] == (0, 1) and o["tp_sum"] == 1.0 for o in out)


def test_world_4_tp2_pp2(tmp_path):
    out = run_distributed(_layout, 4, 2, 2, tmp_dir=tmp_path)
    assert [o["tp"][0] for o in out] == [0, 1, 0, 1]
    assert [o["pp"][0] for o in out] == [0, 0, 1, 1]
    assert [o["first"] for o in out] == [True, True, False, False]
    assert [o["last"] for o in out] == [False, False, True, True]
    assert [o["tp_sum"] for o in out] == [1.0, 1.0, 5.0, 5.0]
    assert out[0]["pp_ranks"] == [0, 2] and out[3]["pp_ranks"] == [1, 3]


def test_world_4_tp2_dp2(tmp_path):
    out = run_distributed(_layout, 4, 2, 1, tmp_dir=tmp_path)
    assert [o["dp"] for o in out] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [o["tp_sum"] for o in out] == [1.0, 1.0, 5.0, 5.0]


def test_world_size_not_divisible_names_sizes(tmp_path):
    with pytest.raises(DistributedTestError, match="not divisible by tensor_model_parallel_size"):
        run_distributed(_layout, 2, 4, 1, tmp_dir=tmp_path)


def _raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")


def test_harness_reports_failing_rank(tmp_path):
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 raised:[\s\S]*boom on purpose"):
        run_distributed(_raise_on_rank_one, 2, tmp_dir=tmp_path)
