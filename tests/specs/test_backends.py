"""The backend switch and the TE layer specs (structure, and the clear error when TE is not usable)."""

from __future__ import annotations

import pytest

from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_usability import TEUnavailableError, is_te_usable
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.context_parallel import ContextParallelDotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from specs import backends
from specs.backends import (
    get_bert_layer_spec,
    get_gpt_layer_spec,
    get_gpt_layer_te_spec,
    get_llama_layer_spec,
    get_llama_layer_te_spec,
    get_t5_layer_specs,
    resolve_backend,
)
from tests.extensions._fake_te import fake_te

no_te = pytest.mark.skipif(is_te_usable(), reason="TE is usable here: these tests check the fallback without it")


@no_te
def test_auto_picks_local_when_te_is_not_usable() -> None:
    assert resolve_backend("auto") == "local"
    attention = get_gpt_layer_spec().submodules.self_attention.submodules
    assert attention.linear_qkv is ColumnParallelLinear
    assert attention.core_attention is ContextParallelDotProductAttention
    assert attention.linear_proj is RowParallelLinear
    assert get_llama_layer_spec().submodules.mlp.submodules.linear_fc1 is ColumnParallelLinear
    assert get_bert_layer_spec().submodules.mlp.submodules.linear_fc1 is ColumnParallelLinear
    encoder, decoder = get_t5_layer_specs()
    assert decoder.submodules.cross_attention.submodules.linear_q is ColumnParallelLinear


@no_te
@pytest.mark.parametrize("ask", [
    lambda: get_gpt_layer_spec(backend="te"),
    lambda: get_gpt_layer_te_spec(),
    lambda: get_llama_layer_spec(backend="te"),
    lambda: get_llama_layer_te_spec(),
    lambda: get_bert_layer_spec(backend="te"),
    lambda: get_t5_layer_specs(backend="te"),
], ids=["gpt-switch", "gpt-te", "llama-switch", "llama-te", "bert-switch", "t5-switch"])
def test_asking_for_te_without_it_raises_the_clear_error(ask) -> None:
    with pytest.raises(TEUnavailableError) as info:
        ask()
    message = str(info.value)
    assert "spec-megatron[te]" in message and "CUDA" in message and "GPU" in message
    assert "get_gpt_layer_local_spec()" in message and "backend='local'" in message


@no_te
def test_building_a_te_spec_without_te_fails_at_build_time_with_the_clear_error() -> None:
    spec = get_gpt_layer_te_spec(check_te=False)  # e.g. written on a laptop for a GPU job
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4)
    with pytest.raises(TEUnavailableError, match="spec-megatron\\[te\\]"):
        GPTModel(config, spec, vocab_size=64, max_sequence_length=16)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        resolve_backend("tensorrt")  # type: ignore[arg-type]


def test_te_spec_structure() -> None:
    layer = get_gpt_layer_te_spec(qk_layernorm=True, use_te_activation_func=True, check_te=False).submodules
    attention = layer.self_attention.submodules
    mlp = layer.mlp.submodules
    assert layer.input_layernorm is IdentityOp and layer.pre_mlp_layernorm is IdentityOp  # fused into the linears
    assert attention.linear_qkv.module == backends.TE_LAYERNORM_LINEAR
    assert attention.core_attention.module == backends.TE_DOT_PRODUCT_ATTENTION
    assert attention.linear_proj.module == backends.TE_ROW_PARALLEL_LINEAR
    assert attention.q_layernorm.module == attention.k_layernorm.module == backends.TE_NORM
    assert mlp.linear_fc1.module == backends.TE_LAYERNORM_LINEAR
    assert mlp.linear_fc2.module == backends.TE_ROW_PARALLEL_LINEAR
    assert mlp.activation_func.module == backends.TE_ACTIVATION
    assert get_gpt_layer_te_spec(check_te=False).submodules.mlp.submodules.activation_func is None


def test_te_spec_moe_slots() -> None:
    from megatron_core.transformer.moe.moe_layer import MoELayer

    layer = get_gpt_layer_te_spec(num_experts=4, check_te=False).submodules
    assert layer.pre_mlp_layernorm.module == backends.TE_NORM  # the router reads the normalised input
    assert layer.mlp.module is MoELayer
    experts = layer.mlp.submodules.experts.submodules
    assert experts.linear_fc1.module == backends.TE_COLUMN_PARALLEL_LINEAR
    assert experts.linear_fc2.module == backends.TE_ROW_PARALLEL_LINEAR
    with pytest.raises(NotImplementedError, match="moe_grouped_gemm=True"):
        get_gpt_layer_te_spec(num_experts=4, moe_grouped_gemm=True, check_te=False)


def test_auto_picks_te_when_usable() -> None:
    """Stand-in TE (CPU). Verifies the backend choice when TE looks usable. Does not verify TE itself."""
    with fake_te():  # TE's API on CPU, and a GPU reported present
        assert resolve_backend("auto") == "te"
        assert get_gpt_layer_spec().submodules.input_layernorm is IdentityOp
        llama = get_llama_layer_spec().submodules.self_attention.submodules
        assert llama.linear_qkv.module == backends.TE_LAYERNORM_LINEAR
        local = get_gpt_layer_spec(backend="local").submodules.self_attention.submodules
        assert local.linear_qkv is ColumnParallelLinear


def test_bert_and_t5_te_specs() -> None:
    bert = backends.get_bert_layer_te_spec(check_te=False).submodules
    assert bert.input_layernorm.module == bert.pre_mlp_layernorm.module == backends.TE_NORM  # post-norm: not fused
    assert bert.self_attention.submodules.linear_qkv.module == backends.TE_COLUMN_PARALLEL_LINEAR
    assert bert.self_attention.params["attn_mask_type"] is AttnMaskType.padding
    decoder = backends.get_t5_decoder_layer_te_spec(check_te=False).submodules
    cross = decoder.cross_attention.submodules
    assert decoder.pre_cross_attn_layernorm is IdentityOp and cross.linear_q.module == backends.TE_LAYERNORM_LINEAR
    assert cross.linear_kv.module == backends.TE_COLUMN_PARALLEL_LINEAR
    encoder = backends.get_t5_encoder_layer_te_spec(check_te=False).submodules
    assert encoder.self_attention.params["attn_mask_type"] is AttnMaskType.padding
