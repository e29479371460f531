"""GPT-J (GPTJForCausalLM) <-> our GPTModel with the GPT-J spec: partial interleaved rotary, parallel layer, biased head."""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import HFInteropError, UnsupportedHFConfigError, blueprint_from_hf_config, to_hf

from .parity import check_hf_to_ours_and_back, check_ours_to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 79


def gptj(attn: str = "eager", **overrides) -> torch.nn.Module:
    fields = dict(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    config = transformers.GPTJConfig(**fields)
    return transformers.GPTJForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gptj_partial_rotary_both_ways(attn):
    ours = check_hf_to_ours_and_back(f"gptj rotary 8/16 {attn}", gptj(attn), VOCAB)
    assert ours.rotary_pos_emb.dim == 8 and ours.config.rotary_interleaved
    assert not ours.share_embeddings_and_output_weights and ours.output_layer.bias is not None
    layer = ours.decoder.layers[0]
    assert layer.self_attention.linear_qkv.bias is None and layer.self_attention.linear_proj.bias is None
    assert layer.mlp.linear_fc1.bias is not None and layer.mlp.linear_fc2.bias is not None


@pytest.mark.parametrize(
    "case,overrides",
    [
        ("full rotary, n_inner=96, gelu", {"rotary_dim": 16, "n_inner": 96, "activation_function": "gelu"}),
        ("tied head", {"tie_word_embeddings": True, "rotary_dim": 4}),
    ],
)
def test_gptj_variants(case, overrides):
    check_hf_to_ours_and_back(f"gptj {case}", gptj(**overrides), VOCAB)


def test_our_gptj_from_spec_to_hf_and_back():
    from megatron_core.models.gpt import GPTModel
    from specs.gptj import GPTJ_MODEL_KWARGS, get_gptj_layer_local_spec, gptj_config

    config = gptj_config(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=80)
    ours = GPTModel(config, get_gptj_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=16,
                    rotary_percent=0.5, **GPTJ_MODEL_KWARGS)
    hf = check_ours_to_hf("ours(gptj spec) -> gptj", ours, VOCAB, attn_implementation="sdpa")
    assert type(hf).__name__ == "GPTJForCausalLM"
    assert (hf.config.rotary_dim, hf.config.n_inner, hf.config.activation_function) == (6, 80, "gelu_new")


def test_unrepresentable_gptj_is_refused():
    for rotary_dim in (3, 12):  # odd; more than the head dimension (8)
        with pytest.raises(UnsupportedHFConfigError, match="rotary_dim.*even and in"):
            blueprint_from_hf_config(transformers.GPTJConfig(n_embd=32, n_head=4, rotary_dim=rotary_dim))
    # A sequential (GPT-2 style) layer stack is not a GPT-J, whatever its config says.
    from megatron_core.models.gpt import GPTModel
    from specs.gpt import get_gpt_layer_local_spec
    from specs.gptj import GPTJ_MODEL_KWARGS, gptj_config

    config = gptj_config(num_layers=1, hidden_size=32, num_attention_heads=4)
    sequential = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=8,
                          **GPTJ_MODEL_KWARGS)
    with pytest.raises(HFInteropError, match="ParallelAttentionMLPLayer"):
        to_hf(sequential, model_type="gptj")
