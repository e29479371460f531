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


# ----------------------------------------------------------------------------- config sizes vs the groups
def _tiny_config(tp: int = 1, pp: int = 1, cp: int = 1):
    from megatron_core.config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             context_parallel_size=cp)


def _build_gpt(config) -> str:
    """Build a tiny GPT; "ok" or the mismatch message."""
    from megatron_core.models.gpt import GPTModel
    from specs.gpt import get_gpt_layer_local_spec

    try:
        GPTModel(config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16)
    except ps.ParallelSizeMismatchError as error:
        return str(error)
    return "ok"


def test_tp2_config_in_a_single_process_raises_naming_field_sizes_and_fix():
    message = _build_gpt(_tiny_config(tp=2))
    assert message.startswith("config.tensor_model_parallel_size=2 but parallel_state (not initialised: a single "
                              "process) has tensor_model_parallel_size=1")
    assert "initialize_model_parallel(tensor_model_parallel_size=2" in message
    assert "or set tensor_model_parallel_size=1 in the config" in message
    assert "pipeline_model_parallel_size=2 but" in _build_gpt(_tiny_config(pp=2))
    assert "context_parallel_size=2 but" in _build_gpt(_tiny_config(cp=2))
    assert _build_gpt(_tiny_config()) == "ok"


def test_every_module_built_from_a_config_checks():
    from megatron_core.tensor_parallel import ColumnParallelLinear
    from megatron_core.transformer.norms import LayerNorm

    config = _tiny_config(tp=2)
    with pytest.raises(ps.ParallelSizeMismatchError, match="tensor_model_parallel_size=2"):
        ColumnParallelLinear(32, 64, config=config, init_method=torch.nn.init.zeros_)
    with pytest.raises(ps.ParallelSizeMismatchError, match="tensor_model_parallel_size=2"):
        LayerNorm(config, 32)


def _mismatch_in_tp2_world() -> dict[str, str]:
    from megatron_core.tensor_parallel import ColumnParallelLinear

    ps.initialize_model_parallel(2, 1)
    # Every rank creates every group (torch.distributed's contract); each keeps a group of itself only.
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    own = singles[dist.get_rank()]
    out = {"tp1_config": _build_gpt(_tiny_config(tp=1)), "tp2_config": _build_gpt(_tiny_config(tp=2))}
    for name, config in (("explicit_group_tp2_config", _tiny_config(tp=2)),
                         ("explicit_group_tp1_config", _tiny_config(tp=1))):
        try:
            ColumnParallelLinear(32, 64, config=config, init_method=torch.nn.init.zeros_, tp_group=own)
            out[name] = "ok"
        except ps.ParallelSizeMismatchError as error:
            out[name] = str(error)
    return out


def test_config_disagreeing_with_a_tp2_world_or_an_explicit_group_raises(tmp_path):
    for result in run_distributed(_mismatch_in_tp2_world, 2, tmp_dir=tmp_path):
        assert result["tp1_config"].startswith(
            "config.tensor_model_parallel_size=1 but parallel_state has tensor_model_parallel_size=2")
        assert result["tp2_config"] == "ok"
        assert result["explicit_group_tp2_config"] == (
            "config.tensor_model_parallel_size=2 but the tp_group passed to the module has 1 rank(s). "
            "Fix: pass a tp_group of 2 ranks, or set tensor_model_parallel_size=1 in the config"
        )
        assert result["explicit_group_tp1_config"] == "ok"  # the explicit group decides, not parallel_state's


def test_unknown_group_argument_is_refused():
    with pytest.raises(ValueError, match="sp_group"):
        ps.check_config_parallel_sizes(_tiny_config(), {"sp_group": None})
