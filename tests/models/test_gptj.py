"""GPT-J as a spec on GPTModel: layout of biases, partial interleaved rotary, causality, biased head (tied too)."""

from __future__ import annotations

import torch

from megatron_core.models.gpt import GPTModel
from megatron_core.transformer.parallel_attention_mlp_layer import ParallelAttentionMLPLayer
from specs.gptj import GPTJ_MODEL_KWARGS, get_gptj_layer_local_spec, gptj_config

VOCAB, B, S = 40, 2, 8


def build(**kwargs) -> GPTModel:
    cfg = gptj_config(num_layers=2, hidden_size=32, num_attention_heads=4, init_method_std=0.2)
    return GPTModel(cfg, get_gptj_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=S,
                    **{**GPTJ_MODEL_KWARGS, "rotary_percent": 0.5, **kwargs}).eval()


def test_gptj_layout():
    model = build()
    keys = set(model.state_dict())
    assert all(isinstance(layer, ParallelAttentionMLPLayer) for layer in model.decoder.layers)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in keys
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in keys
    assert {"decoder.layers.0.mlp.linear_fc1.bias", "decoder.layers.0.mlp.linear_fc2.bias"} <= keys
    assert not any("pre_mlp_layernorm" in k for k in keys)
    assert {"output_layer.weight", "output_layer.bias"} <= keys
    assert model.rotary_pos_emb.dim == 4 and model.rotary_pos_emb.rotary_interleaved


def test_causal_and_the_head_bias_is_added():
    model = build()
    ids = torch.randint(0, VOCAB, (B, S))
    positions = torch.arange(S).expand(B, S)
    with torch.no_grad():
        logits = model(ids, positions, None)
        changed = ids.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB
        assert torch.equal(model(changed, positions, None)[:, :5], logits[:, :5])
        model.output_layer.bias.add_(1.0)
        torch.testing.assert_close(model(ids, positions, None), logits + 1.0, atol=1e-5, rtol=0)


def test_tied_head_keeps_its_bias():
    model = build(share_embeddings_and_output_weights=True)
    keys = set(model.state_dict())
    assert "output_layer.bias" in keys and "output_layer.weight" not in keys
    ids = torch.randint(0, VOCAB, (B, S))
    assert model(ids, torch.arange(S).expand(B, S), None).shape == (B, S, VOCAB)


def test_zoo_specs_survive_a_yaml_round_trip():
    from megatron_core.transformer.spec_utils import spec_from_yaml, spec_to_dict, spec_to_yaml
    from specs.bert import get_bert_layer_local_spec
    from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec

    for factory in (get_gptj_layer_local_spec, get_bert_layer_local_spec, get_t5_encoder_layer_local_spec,
                    get_t5_decoder_layer_local_spec):
        spec = factory()
        assert spec_to_dict(spec_from_yaml(spec_to_yaml(spec))) == spec_to_dict(spec), factory.__name__
