"""MoE config validation (errors name the field), the EP process groups, and MoE specs."""

from __future__ import annotations

import pytest
import torch

from megatron_core import TransformerConfig
from megatron_core import parallel_state as ps
from megatron_core.config_moe import moe_layer_pattern
from megatron_core.models.gpt import GPTModel
from megatron_core.testing import DistributedTestError, run_distributed
from megatron_core.transformer.moe import MoELayer, TopKRouter
from megatron_core.transformer.spec_utils import SpecError
from specs.gpt import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from tests.transformer.moe.moe_harness import moe_config

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4)


@pytest.mark.parametrize("overrides,field", [
    (dict(num_moe_experts=4, moe_router_topk=5), "moe_router_topk"),
    (dict(num_moe_experts=6, expert_model_parallel_size=4), "num_moe_experts"),
    (dict(num_moe_experts=0), "num_moe_experts"),
    (dict(expert_model_parallel_size=2), "expert_model_parallel_size"),
    (dict(moe_shared_expert_intermediate_size=64), "moe_shared_expert_intermediate_size"),
    (dict(num_moe_experts=4, moe_router_topk=1), "moe_router_pre_softmax"),
    (dict(num_moe_experts=4, moe_shared_expert_gate=True), "moe_shared_expert_gate"),
    (dict(num_moe_experts=4, moe_expert_capacity_factor=0.0), "moe_expert_capacity_factor"),
    (dict(num_moe_experts=4, moe_layer_freq=[1, 0, 1]), "moe_layer_freq"),
    (dict(num_moe_experts=4, moe_ffn_hidden_size=30, tensor_model_parallel_size=4), "moe_ffn_hidden_size"),
    (dict(num_moe_experts=4, moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
    (dict(num_moe_experts=4, moe_router_score_function="sigmoid", moe_router_pre_softmax=True),
     "moe_router_pre_softmax"),
])
def test_bad_moe_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        TransformerConfig(**{**BASE, **overrides})
    assert f"Value error, {field}=" in str(err.value)
    assert "Fix:" in str(err.value)


def test_moe_defaults_and_layer_pattern():
    config = TransformerConfig(**BASE, ffn_hidden_size=96, num_moe_experts=4)
    assert config.moe_ffn_hidden_size == 96 and config.moe_router_topk == 2
    assert moe_layer_pattern(config) == [True, True]
    assert moe_layer_pattern(TransformerConfig(**{**BASE, "num_layers": 4}, num_moe_experts=4, moe_layer_freq=2)) == \
        [True, False, True, False]
    assert TransformerConfig.from_yaml(config.to_yaml()) == config


def _groups(tp: int, ep: int, cp: int = 1) -> dict:
    ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep, context_parallel_size=cp)
    ep_group, edp_group = ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()
    return {"ep": torch.distributed.get_process_group_ranks(ep_group),
            "edp": torch.distributed.get_process_group_ranks(edp_group),
            "ep_rank": ps.get_expert_model_parallel_rank(), "edp_rank": ps.get_expert_data_parallel_rank(),
            "sizes": (ps.get_expert_model_parallel_world_size(), ps.get_expert_data_parallel_world_size())}


def test_expert_groups_are_carved_out_of_data_parallel_ranks(tmp_path):
    # TP=1, EP=2 on 4 ranks: DP = 4 = EP 2 x expert-DP 2.
    got = run_distributed(_groups, 4, 1, 2, tmp_dir=tmp_path)
    assert [g["ep"] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["edp"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(g["ep_rank"], g["edp_rank"]) for g in got] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # TP=2, EP=2: EP groups join ranks with the same TP index.
    got = run_distributed(_groups, 4, 2, 2, tmp_dir=tmp_path)
    assert [g["ep"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["sizes"] for g in got] == [(2, 1)] * 4


def test_expert_groups_are_carved_out_of_data_times_context_parallel_ranks(tmp_path):
    # CP=2 x DP=2 on 4 ranks (rank = cp_rank + 2 dp_rank): EP=2 joins the two CP ranks of a DP rank,
    # expert-DP joins equal CP positions; EP=4 spans DP and CP.
    got = run_distributed(_groups, 4, 1, 2, 2, tmp_dir=tmp_path)
    assert [g["ep"] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["edp"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(g["ep_rank"], g["edp_rank"]) for g in got] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    got = run_distributed(_groups, 4, 1, 4, 2, tmp_dir=tmp_path)
    assert [g["ep"] for g in got] == [[0, 1, 2, 3]] * 4 and [g["edp"] for g in got] == [[0], [1], [2], [3]]
    assert [g["ep_rank"] for g in got] == [0, 1, 2, 3] and [g["sizes"] for g in got] == [(4, 1)] * 4


def _bad_ep() -> None:
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=4)


def test_world_that_cannot_hold_tp_ep_pp_is_refused(tmp_path):
    with pytest.raises(DistributedTestError, match="expert_model_parallel_size=4 must divide"):
        run_distributed(_bad_ep, 2, tmp_dir=tmp_path)
    with pytest.raises(ps.ParallelStateError, match="expert_model_parallel_size=2"):
        ps.initialize_model_parallel(1, 1, expert_model_parallel_size=2)


class _MyRouter(TopKRouter):
    """A custom router: the one line in the spec is all it takes."""


def test_custom_router_is_one_spec_line_and_bad_slots_are_named():
    config = moe_config()
    spec = get_gpt_layer_local_spec(num_experts=8)
    spec.submodules.mlp.submodules.router = _MyRouter
    model = GPTModel(config, spec, vocab_size=64, max_sequence_length=8)
    assert isinstance(model.decoder.layers[0].mlp.router, _MyRouter)

    class BadRouter(torch.nn.Module):
        def __init__(self, hidden_size: int) -> None:
            super().__init__()

    spec.submodules.mlp.submodules.router = BadRouter
    with pytest.raises(SpecError, match="router.*RouterBuilder"):
        GPTModel(config, spec, vocab_size=64, max_sequence_length=8)


def test_layer_freq_block_spec_mixes_dense_and_moe_layers():
    config = moe_config(num_layers=3, moe_layer_freq=[0, 1, 1])
    model = GPTModel(config, get_gpt_decoder_block_spec(config), vocab_size=64, max_sequence_length=8)
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MLP", "MoELayer", "MoELayer"]
    assert isinstance(model.decoder.layers[1].mlp, MoELayer)
