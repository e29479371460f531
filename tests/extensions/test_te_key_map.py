"""The TE <-> local state-dict key map, as pure functions on local models' state dicts."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_key_map import (
    KeyMapError,
    local_norm_prefix,
    local_to_te_state_dict,
    te_to_local_state_dict,
)
from megatron_core.models.gpt import GPTModel
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec, llama_config
from tests.paths import MCORE_GPT_FIXTURE as FIXTURES


def _gpt_state_dict() -> dict[str, torch.Tensor]:
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16).state_dict()


def _llama_state_dict() -> dict[str, torch.Tensor]:
    config = llama_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64)
    model = GPTModel(config, get_llama_layer_local_spec(), vocab_size=64, max_sequence_length=16,
                     **LLAMA_MODEL_KWARGS)
    return model.state_dict()


def test_local_to_te_uses_te_names_for_the_fused_norms() -> None:
    local = _gpt_state_dict()
    te = local_to_te_state_dict(local)
    layer = "decoder.layers.1."
    for local_key, te_key in [
        ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
        ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
        ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
        ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
    ]:
        assert layer + local_key not in te
        assert te[layer + te_key] is local[layer + local_key]  # same tensor, renamed
    # everything else, final norm included, keeps its name and tensor
    for key in ("decoder.final_layernorm.weight", "embedding.word_embeddings.weight",
                layer + "self_attention.linear_qkv.weight", layer + "mlp.linear_fc2.bias"):
        assert te[key] is local[key]
    assert len(te) == len(local)


@pytest.mark.parametrize("make", [_gpt_state_dict, _llama_state_dict], ids=["gpt", "llama"])
def test_local_to_te_to_local_is_the_identity(make) -> None:
    local = make()
    back = te_to_local_state_dict(local_to_te_state_dict(local))
    assert list(back) == list(local)  # same keys, same order
    assert all(back[k] is local[k] for k in local)


def test_rmsnorm_layers_have_no_norm_bias() -> None:
    te = local_to_te_state_dict(_llama_state_dict())
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert not any(k.endswith("layer_norm_bias") for k in te)


def test_extra_state_is_added_on_request_and_dropped_on_the_way_back() -> None:
    local = _gpt_state_dict()
    te = local_to_te_state_dict(local, with_extra_state=True)
    extra = sorted(k for k in te if k.endswith("._extra_state"))
    slots = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
             "mlp.linear_fc1", "mlp.linear_fc2")
    assert extra == sorted(f"decoder.layers.{i}.{slot}._extra_state" for i in range(2) for slot in slots)
    assert all(te[k].dtype == torch.uint8 and te[k].numel() == 0 for k in extra)
    assert te_to_local_state_dict(te) == local


def test_separate_norms_keep_their_names() -> None:
    """BERT's TE spec keeps its (post-)norms apart: only _extra_state entries are added."""
    local = _gpt_state_dict()
    te = local_to_te_state_dict(local, fused_norms=False, with_extra_state=True)
    assert {k for k in te if not k.endswith("_extra_state")} == set(local)
    assert "decoder.layers.0.input_layernorm._extra_state" in te
    assert "decoder.final_layernorm._extra_state" not in te  # the block's final norm stays local
    assert te_to_local_state_dict(te) == local


def test_fp8_extra_state_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    te = local_to_te_state_dict(_gpt_state_dict(), with_extra_state=True)
    te["decoder.layers.0.mlp.linear_fc1._extra_state"] = torch.ones(8, dtype=torch.uint8)  # FP8 metadata
    with caplog.at_level(logging.WARNING, logger="megatron_core.extensions.te_key_map"):
        local = te_to_local_state_dict(te)
    assert not any(k.endswith("_extra_state") for k in local)
    assert "decoder.layers.0.mlp.linear_fc1._extra_state" in caplog.text


def test_a_state_dict_with_both_namings_is_refused() -> None:
    te = local_to_te_state_dict(_gpt_state_dict())
    te["decoder.layers.0.input_layernorm.weight"] = torch.ones(32)
    with pytest.raises(KeyMapError, match="decoder.layers.0.input_layernorm.weight"):
        te_to_local_state_dict(te)


def test_local_norm_prefix() -> None:
    assert local_norm_prefix("decoder.layers.3.self_attention.linear_qkv.") == "decoder.layers.3.input_layernorm."
    assert local_norm_prefix("module.decoder.layers.0.mlp.linear_fc1.") == "module.decoder.layers.0.pre_mlp_layernorm."
    assert local_norm_prefix("mlp.linear_fc1.") == "pre_mlp_layernorm."
    assert local_norm_prefix("layers.0.cross_attention.linear_q.") == "layers.0.pre_cross_attn_layernorm."
    assert local_norm_prefix("decoder.layers.0.self_attention.linear_proj.") is None
    assert local_norm_prefix("decoder.layers.0.xmlp.linear_fc1.") is None


def test_megatron_core_local_state_dict_round_trips() -> None:
    """The map works on a state dict written by Megatron-Core itself (its local spec's names)."""
    fixtures = torch.load(FIXTURES, weights_only=True)
    for name in ("gpt_learned_tied", "llama_gqa_rope"):
        local = fixtures[name]["state_dict"]
        te = local_to_te_state_dict(local)
        assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in te
        assert te_to_local_state_dict(te) == local
