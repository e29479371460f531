"""ParallelAttentionMLPLayer: x + attn(norm(x)) + mlp(norm(x)), one shared or two norms, refused misuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_core.transformer.norms import LayerNorm
from megatron_core.transformer.parallel_attention_mlp_layer import ParallelAttentionMLPLayer
from megatron_core.transformer.positions import RotaryEmbedding
from megatron_core.transformer.spec_utils import build_module
from specs.gptj import get_gptj_layer_local_spec, gptj_config
from specs.t5 import get_t5_decoder_layer_local_spec

S, B, H = 6, 2, 32


def _config(**overrides):
    return gptj_config(num_layers=2, hidden_size=H, num_attention_heads=4, init_method_std=0.2, **overrides)


def _perturbed(layer: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def test_attention_and_mlp_read_the_same_normed_input():
    layer = _perturbed(build_module(get_gptj_layer_local_spec(), config=_config(), layer_number=1))
    assert isinstance(layer, ParallelAttentionMLPLayer) and layer.shared_norm
    x = torch.randn(S, B, H)
    rotary = RotaryEmbedding(8, rotary_percent=0.5, rotary_interleaved=True)(S)
    out, _ = layer(x, rotary_pos_emb=rotary)
    normed = layer.input_layernorm(x)
    attn, attn_bias = layer.self_attention(normed, attention_mask=None, rotary_pos_emb=rotary)
    mlp, mlp_bias = layer.mlp(normed)
    assert attn_bias is None and mlp_bias is not None  # GPT-J: bias-free attention, biased MLP
    torch.testing.assert_close(out, x + attn + (mlp + mlp_bias), atol=1e-6, rtol=0)


def test_a_filled_pre_mlp_norm_gives_the_mlp_its_own_norm():
    spec = get_gptj_layer_local_spec()
    spec.submodules = dataclasses.replace(spec.submodules, pre_mlp_layernorm=LayerNorm)
    layer = _perturbed(build_module(spec, config=_config(), layer_number=1))
    assert not layer.shared_norm and "pre_mlp_layernorm.weight" in layer.state_dict()
    x = torch.randn(S, B, H)
    out, _ = layer(x)
    attn, _ = layer.self_attention(layer.input_layernorm(x), attention_mask=None)
    mlp, mlp_bias = layer.mlp(layer.pre_mlp_layernorm(x))
    torch.testing.assert_close(out, x + attn + mlp + mlp_bias, atol=1e-6, rtol=0)


def test_post_norm_and_cross_attention_are_refused():
    with pytest.raises(ValueError, match="layernorm_position='post'"):
        build_module(get_gptj_layer_local_spec(), config=_config(layernorm_position="post"), layer_number=1)
    spec = get_gptj_layer_local_spec()
    decoder = get_t5_decoder_layer_local_spec().submodules
    spec.submodules = dataclasses.replace(spec.submodules, cross_attention=decoder.cross_attention)
    with pytest.raises(ValueError, match="no cross-attention"):
        build_module(spec, config=_config(), layer_number=1)
