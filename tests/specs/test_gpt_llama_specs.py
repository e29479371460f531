"""The ready-made GPT and Llama local specs: module tree, options, YAML round trip, llama_config."""

from __future__ import annotations

import pytest
import torch

from megatron_core.config import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import SelfAttention
from megatron_core.transformer.context_parallel import ContextParallelDotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.mlp import MLP
from megatron_core.transformer.norms import LayerNorm, RMSNorm
from megatron_core.transformer.spec_utils import spec_from_yaml, spec_to_yaml
from megatron_core.transformer.transformer_layer import TransformerLayer
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec, llama_config


def _config(**overrides) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **overrides)


def test_local_spec_tree():
    spec = get_gpt_layer_local_spec()
    subs = spec.submodules
    assert spec.module is TransformerLayer
    assert subs.self_attention.module is SelfAttention
    assert subs.self_attention.params == {"attn_mask_type": AttnMaskType.causal}
    attn = subs.self_attention.submodules
    assert (attn.linear_qkv, attn.core_attention, attn.linear_proj) == (
        ColumnParallelLinear, ContextParallelDotProductAttention, RowParallelLinear)
    assert subs.mlp.module is MLP
    assert (subs.mlp.submodules.linear_fc1, subs.mlp.submodules.linear_fc2) == (ColumnParallelLinear,
                                                                                 RowParallelLinear)


def test_spec_options():
    model = GPTModel(_config(qk_layernorm=True), get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
                     64, 16)
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.self_attention.q_layernorm, RMSNorm)
    assert "decoder.layers.0.self_attention.k_layernorm.weight" in model.state_dict()
    assert isinstance(GPTModel(_config(), get_gpt_layer_local_spec(), 64, 16).decoder.layers[0].input_layernorm,
                      LayerNorm)
    assert get_gpt_layer_local_spec(num_experts=4).submodules.mlp.module.__name__ == "MoELayer"
    with pytest.raises(ValueError, match="normalization"):
        get_gpt_layer_local_spec(normalization="BatchNorm")  # type: ignore[arg-type]


def test_yaml_round_trip_builds_the_same_model():
    spec = get_llama_layer_local_spec()
    again = spec_from_yaml(spec_to_yaml(spec))
    cfg = llama_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48)
    torch.manual_seed(1)
    a = GPTModel(cfg, spec, 64, 16, **LLAMA_MODEL_KWARGS).eval()
    torch.manual_seed(1)
    b = GPTModel(cfg, again, 64, 16, **LLAMA_MODEL_KWARGS).eval()
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(b(ids, None, None), a(ids, None, None), rtol=0, atol=0)


def test_llama_config_defaults_and_model():
    cfg = llama_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48)
    assert (cfg.normalization, cfg.activation_func, cfg.gated_linear_unit, cfg.add_bias_linear) == (
        "RMSNorm", "swiglu", True, False)
    assert llama_config(num_layers=1, hidden_size=32, num_attention_heads=4, layernorm_epsilon=1e-6).layernorm_epsilon \
        == 1e-6
    model = GPTModel(cfg, get_llama_layer_local_spec(), 64, 16, **LLAMA_MODEL_KWARGS)
    keys = model.state_dict().keys()
    assert "output_layer.weight" in keys and "embedding.position_embeddings.weight" not in keys
    assert not any(k.endswith(".bias") for k in keys)
    assert model.state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)
    assert model.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 48, 32)
