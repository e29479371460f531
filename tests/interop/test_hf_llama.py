"""Llama <-> our GPTModel (local Llama spec): GQA, RMSNorm, SwiGLU, RoPE; parity both ways."""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import UnsupportedHFConfigError, blueprint_from_hf_config

from .parity import check_hf_to_ours_and_back, check_ours_to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 89


def llama(attn: str = "eager", **overrides) -> torch.nn.Module:
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  bos_token_id=0, eos_token_id=0, pad_token_id=None)
    fields.update(overrides)
    config = transformers.LlamaConfig(**fields)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_gqa_both_ways(attn):
    check_hf_to_ours_and_back(f"llama gqa 4q/2kv {attn}", llama(attn), VOCAB)


@pytest.mark.parametrize(
    "case,overrides",
    [
        ("tied", {"tie_word_embeddings": True}),
        ("mqa theta=500000", {"num_key_value_heads": 1, "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 500000.0}}),
        ("mha head_dim=8", {"num_key_value_heads": 4, "head_dim": 8}),
        ("biases", {"attention_bias": True, "mlp_bias": True}),
    ],
)
def test_llama_variants(case, overrides):
    check_hf_to_ours_and_back(f"llama {case}", llama(**overrides), VOCAB)


def test_our_llama_spec_model_to_hf():
    from megatron_core.config import TransformerConfig
    from megatron_core.models.gpt import GPTModel
    from specs.llama import get_llama_layer_local_spec

    config = TransformerConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=3,
                               ffn_hidden_size=64, activation_func="swiglu", normalization="RMSNorm",
                               add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    ours = GPTModel(config, get_llama_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=16,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_base=10000)
    hf = check_ours_to_hf("ours(llama local spec) -> llama", ours, VOCAB, attn_implementation="sdpa")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.config.num_key_value_heads, hf.config.intermediate_size, hf.config.hidden_act) == (3, 64, "silu")


def test_blueprint_maps_llama_fields():
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=100, num_hidden_layers=3, rms_norm_eps=1e-5,
                                      max_position_embeddings=128, vocab_size=VOCAB,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    bp = blueprint_from_hf_config(config)
    cfg = bp.config
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (8, 2, 8, 100)
    assert (cfg.normalization, cfg.activation_func, cfg.gated_linear_unit, cfg.add_bias_linear) == (
        "RMSNorm", "swiglu", True, False)
    assert cfg.layernorm_epsilon == 1e-5 and not cfg.rotary_interleaved
    assert bp.model_kwargs == {"vocab_size": VOCAB, "max_sequence_length": 128, "position_embedding_type": "rope",
                               "share_embeddings_and_output_weights": False, "rotary_percent": 1.0,
                               "rotary_base": 1e6}


@pytest.mark.parametrize(
    "overrides,field,match",
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
         "rope_parameters.rope_type", "only unscaled RoPE"),
        ({"attention_bias": True, "mlp_bias": False}, "attention_bias", "all four projections"),
        ({"hidden_act": "gelu_new"}, "hidden_act", "no registered gated variant"),
        ({"hidden_act": "gelu_10"}, "hidden_act", "no activation of ours"),
    ],
)
def test_unrepresentable_llama_configs_are_refused(overrides, field, match):
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                      intermediate_size=40, vocab_size=VOCAB, **overrides)
    with pytest.raises(UnsupportedHFConfigError, match=match) as info:
        blueprint_from_hf_config(config)
    assert info.value.field_name == field and "Fix:" in str(info.value)


@pytest.mark.parametrize("layout", ["left_padded", "packed"])
def test_rope_honours_position_ids_like_hf(layout):
    # HF Llama rotates by position_ids; ours must too. (A uniform offset would prove nothing: RoPE
    # scores depend on relative positions only, so the cases break the 0..s-1 pattern.)
    from megatron_core.interop import from_hf

    hf = llama("eager").eval()
    ours = from_hf(hf).eval()
    b, s = 2, 10
    tokens = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(1))
    ramp = torch.arange(s)
    if layout == "left_padded":
        second = torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(6)])
    else:  # two documents of 5 tokens packed in one row
        second = torch.cat([torch.arange(5), torch.arange(5)])
    positions = torch.stack([ramp, second])
    with torch.no_grad():
        expected = hf(tokens, position_ids=positions).logits
        actual = ours(tokens, positions, None)
        default = ours(tokens, ramp.expand(b, s), None)
    assert (actual - expected).abs().max().item() <= 1e-5
    assert (default - expected).abs().max().item() > 1e-3  # the positions really changed the result
