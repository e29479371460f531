"""GPT-2 <-> our GPTModel (local GPT spec): logits parity both ways and exact round trips."""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import UnsupportedHFConfigError, blueprint_from_hf_config, get_family

from .parity import check_hf_to_ours_and_back, check_ours_to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 97


def gpt2(attn: str = "eager", **overrides) -> torch.nn.Module:
    fields = dict(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    config = transformers.GPT2Config(**fields)
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn, dtype=torch.float32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tied_gpt2_both_ways(attn):
    ours = check_hf_to_ours_and_back(f"gpt2 tied {attn}", gpt2(attn), VOCAB)
    assert "output_layer.weight" not in ours.state_dict() or ours.share_embeddings_and_output_weights


@pytest.mark.parametrize(
    "case,overrides",
    [
        ("untied", {"tie_word_embeddings": False}),
        ("gelu n_inner=80 eps=1e-6", {"activation_function": "gelu", "n_inner": 80, "layer_norm_epsilon": 1e-6}),
        ("unscaled attention", {"scale_attn_weights": False}),
    ],
)
def test_gpt2_variants(case, overrides):
    check_hf_to_ours_and_back(f"gpt2 {case}", gpt2(**overrides), VOCAB)


def test_reorder_and_upcast_attn_in_bf16():
    """``reorder_and_upcast_attn=True`` (scores and softmax in fp32) is where bf16 precision is at stake: it maps
    to our fp32 softmax, so in bf16 our logits are as close to the fp32 truth as Hugging Face's own (measured:
    max |err| 0.44 ours vs 0.45 HF, logits ~10); fp32 parity and the exact round trip hold as for any variant."""
    hf = gpt2(reorder_and_upcast_attn=True, n_positions=64, initializer_range=0.2)
    ours = check_hf_to_ours_and_back("gpt2 reorder_and_upcast_attn", hf, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        truth = hf(tokens).logits.double()
        hf_err = (hf.to(torch.bfloat16)(tokens).logits.double() - truth).abs().max()
        our_err = (ours.to(torch.bfloat16)(tokens, positions, None).double() - truth).abs().max()
    assert our_err <= 1.5 * hf_err, (float(our_err), float(hf_err))


def test_our_gpt_from_local_spec_to_gpt2():
    from megatron_core.config import TransformerConfig
    from megatron_core.models.gpt import GPTModel
    from specs.gpt import get_gpt_layer_local_spec

    config = TransformerConfig(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96,
                               activation_func="gelu_tanh", hidden_dropout=0.0, attention_dropout=0.0)
    ours = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=16)
    hf = check_ours_to_hf("ours(gpt local spec) -> gpt2", ours, VOCAB, attn_implementation="sdpa")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.activation_function == "gelu_new" and hf.config.n_inner == 96


def test_blueprint_maps_gpt2_fields():
    config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=40, vocab_size=VOCAB,
                                     layer_norm_epsilon=1e-6, resid_pdrop=0.2, attn_pdrop=0.3, initializer_range=0.05,
                                     bos_token_id=0, eos_token_id=0)
    bp = blueprint_from_hf_config(config)
    cfg = bp.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (3, 64, 4, 4)
    assert (cfg.ffn_hidden_size, cfg.activation_func, cfg.normalization, cfg.add_bias_linear) == (
        256, "gelu_tanh", "LayerNorm", True)
    assert (cfg.layernorm_epsilon, cfg.hidden_dropout, cfg.attention_dropout, cfg.init_method_std) == (
        1e-6, 0.2, 0.3, 0.05)
    assert cfg.softmax_scale is None
    assert bp.model_kwargs == {"vocab_size": VOCAB, "max_sequence_length": 40,
                               "position_embedding_type": "learned_absolute",
                               "share_embeddings_and_output_weights": True}
    assert blueprint_from_hf_config(transformers.GPT2Config(scale_attn_weights=False)).config.softmax_scale == 1.0


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("scale_attn_by_inverse_layer_idx", True, "one softmax_scale for all layers"),
        ("add_cross_attention", True, "decoder-only"),
        ("activation_function", "gelu_accurate", "no activation of ours"),
    ],
)
def test_unrepresentable_gpt2_configs_are_refused(field, value, match):
    config = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=2, **{field: value})
    with pytest.raises(UnsupportedHFConfigError, match=match) as info:
        blueprint_from_hf_config(config)
    assert info.value.field_name == field and field in str(info.value) and "Fix:" in str(info.value)


def test_gpt2_refuses_what_it_cannot_hold():
    from megatron_core.config import TransformerConfig
    from megatron_core.interop.registry import Blueprint

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            normalization="RMSNorm", activation_func="swiglu", add_bias_linear=False)
    bp = Blueprint("gpt2", cfg, {"vocab_size": 10, "max_sequence_length": 8, "position_embedding_type": "rope",
                                 "share_embeddings_and_output_weights": True})
    reason = get_family("gpt2").unsupported_reason(bp)
    assert reason is not None
    for part in ("position_embedding_type='rope'", "RMSNorm", "swiglu", "add_bias_linear=False", "num_query_groups=2"):
        assert part in reason
