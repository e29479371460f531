"""TransformerLayer: pre-norm and post-norm against manual composition, cross-attention slots, dropout."""

from __future__ import annotations

import torch

from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.norms import WrappedNorm
from megatron_core.transformer.spec_utils import ModuleSpec, build_module
from megatron_core.transformer.transformer_layer import TransformerLayer
from specs.gpt import get_gpt_layer_local_spec

S, B, H = 5, 2, 32


def _config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=H, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _layer(cfg: TransformerConfig, spec: ModuleSpec | None = None) -> TransformerLayer:
    return build_module(spec or get_gpt_layer_local_spec(), config=cfg, layer_number=1)


def _with_bias(out_bias):
    out, bias = out_bias
    return out if bias is None else out + bias


def test_pre_norm_layer_is_x_plus_f_of_norm_x():
    layer = _layer(_config())
    x = torch.randn(S, B, H)
    h = x + _with_bias(layer.self_attention(layer.input_layernorm(x), None))
    expected = h + _with_bias(layer.mlp(layer.pre_mlp_layernorm(h)))
    out, context = layer(x)
    torch.testing.assert_close(out, expected)
    assert context is None


def test_post_norm_layer_normalises_after_each_residual():
    layer = _layer(_config(layernorm_position="post"))
    with torch.no_grad():  # non-trivial norm parameters so a misplaced norm would show
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(S, B, H)
    h = layer.input_layernorm(x + _with_bias(layer.self_attention(x, None)))
    expected = layer.pre_mlp_layernorm(h + _with_bias(layer.mlp(h)))
    torch.testing.assert_close(layer(x)[0], expected)
    # Same parameter names as the pre-norm layer: checkpoints and converters see one key set.
    assert layer.state_dict().keys() == _layer(_config()).state_dict().keys()


def test_residual_from_layernorm_output_option():
    layer = _layer(_config(apply_residual_connection_post_layernorm=True))
    x = torch.randn(S, B, H)
    normed = layer.input_layernorm(x)
    h = normed + _with_bias(layer.self_attention(normed, None))
    normed2 = layer.pre_mlp_layernorm(h)
    torch.testing.assert_close(layer(x)[0], normed2 + _with_bias(layer.mlp(normed2)))


def test_cross_attention_slots_are_used_when_filled():
    spec = get_gpt_layer_local_spec()
    spec.submodules.pre_cross_attn_layernorm = WrappedNorm
    spec.submodules.cross_attention = ModuleSpec(
        CrossAttention, params={"attn_mask_type": AttnMaskType.padding},
        submodules=CrossAttentionSubmodules(ColumnParallelLinear, ColumnParallelLinear, DotProductAttention,
                                            RowParallelLinear),
    )
    spec.submodules.cross_attn_bda = get_bias_dropout_add
    layer = _layer(_config(), spec)
    x, context = torch.randn(S, B, H), torch.randn(7, B, H)
    h = x + _with_bias(layer.self_attention(layer.input_layernorm(x), None))
    h = h + _with_bias(layer.cross_attention(layer.pre_cross_attn_layernorm(h), None, key_value_states=context))
    expected = h + _with_bias(layer.mlp(layer.pre_mlp_layernorm(h)))
    out, ctx_out = layer(x, context=context)
    torch.testing.assert_close(out, expected)
    assert ctx_out is context
    assert "cross_attention.linear_kv.weight" in layer.state_dict()


def test_hidden_dropout_only_in_training():
    layer = _layer(_config(hidden_dropout=0.5))
    no_dropout = _layer(_config())
    no_dropout.load_state_dict(layer.state_dict())
    x = torch.randn(S, B, H)
    eval_out = layer.eval()(x)[0]
    torch.testing.assert_close(eval_out, no_dropout.eval()(x)[0])
    assert not torch.allclose(layer.train()(x)[0], eval_out)
    assert TransformerLayer(_config(), get_gpt_layer_local_spec().submodules, hidden_dropout=0.3).hidden_dropout == 0.3
