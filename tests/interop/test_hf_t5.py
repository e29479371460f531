"""T5 (T5ForConditionalGeneration, v1.0 and v1.1) <-> our T5Model: decoder logits with padding, both ways; exact round trips.

transformers 5 ties ``lm_head`` to ``shared`` at construction and takes the head's scaling from
``config.scale_decoder_outputs``; a v1.1 checkpoint (own head) loads untied. The cases cover
tied + scaled (v1.0), tied + unscaled (a v1.1 config built fresh) and untied + unscaled (a v1.1
checkpoint, simulated by giving the head its own parameter).
"""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import HFInteropError, UnsupportedHFConfigError, from_hf, to_hf

from .parity import perturb_, record

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, S_ENC, S_DEC = 71, 3, 13, 9


def t5(attn: str = "eager", untie: bool = False, **overrides) -> torch.nn.Module:
    fields = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, initializer_factor=0.3)
    fields.update(overrides)
    config = transformers.T5Config(**fields)
    model = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float32)
    if untie:  # what from_pretrained gives for a checkpoint with its own lm_head
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return perturb_(model.eval())


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    enc_mask = torch.ones(BATCH, S_ENC, dtype=torch.long)
    enc_mask[1, 9:] = 0
    enc_mask[2, 3:] = 0
    dec_mask = torch.ones(BATCH, S_DEC, dtype=torch.long)
    dec_mask[0, 6:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, S_ENC), generator=g), "attention_mask": enc_mask,
            "decoder_input_ids": torch.randint(0, VOCAB, (BATCH, S_DEC), generator=g),
            "decoder_attention_mask": dec_mask}


def compare(case: str, ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    x = inputs()
    with torch.no_grad():
        want = hf(**x).logits
        got = ours(x["input_ids"], x["decoder_input_ids"], x["attention_mask"], x["decoder_attention_mask"])
    record(case, got, want)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], case: str) -> None:
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{case}: {key} differs after the round trip"


@pytest.mark.parametrize(
    "case,attn,untie,overrides,tied,scaled",
    [
        ("v1.0 relu tied", "eager", False, {}, True, True),
        ("v1.0 relu tied sdpa, 3 decoder layers", "sdpa", False, {"num_decoder_layers": 3}, True, True),
        ("v1.1 gated-gelu fresh config", "eager", False,
         {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, True, False),
        ("v1.1 gated-gelu untied head", "eager", True,
         {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, False, False),
    ],
)
def test_t5_both_ways(case, attn, untie, overrides, tied, scaled):
    hf = t5(attn, untie, **overrides)
    ours = from_hf(hf)
    assert (ours.share_embeddings_and_output_weights, ours.scale_decoder_outputs) == (tied, scaled)
    assert ours.config.gated_linear_unit == ("gated" in overrides.get("feed_forward_proj", ""))
    compare(f"t5 {case} from_hf", ours, hf)
    back = to_hf(ours)
    assert (back.lm_head.weight is back.shared.weight) == tied
    assert_same_state(back.state_dict(), hf.state_dict(), f"t5 {case}")
    compare(f"t5 {case} to_hf(from_hf)", ours, back.eval())


@pytest.mark.parametrize("version,tied", [("1.0", True), ("1.1", False)])
def test_our_t5_from_spec_to_hf_and_back(version, tied):
    from megatron_core.models.t5 import T5Model
    from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec, t5_config

    config = t5_config(version, num_layers=2, hidden_size=32, num_attention_heads=2, kv_channels=12,
                       ffn_hidden_size=40, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    ours = perturb_(T5Model(config, get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec(),
                            vocab_size=VOCAB, max_sequence_length=32, share_embeddings_and_output_weights=tied,
                            relative_attention_num_buckets=16, relative_attention_max_distance=32).eval(), 0.05)
    hf = to_hf(ours).eval()
    expected = ("relu", "relu") if version == "1.0" else ("gated-gelu", "gelu_new")
    assert (hf.config.feed_forward_proj, hf.config.dense_act_fn) == expected
    assert (hf.config.d_kv, hf.config.scale_decoder_outputs) == (12, tied)
    compare(f"ours(t5 {version} spec) -> t5", ours, hf)
    assert_same_state(from_hf(hf).state_dict(), ours.state_dict(), f"ours t5 {version} -> t5 -> ours")


def test_unrepresentable_t5_is_refused():
    with pytest.raises(UnsupportedHFConfigError, match="feed_forward_proj"):
        from_hf(t5(feed_forward_proj="gated-gelu_accurate"))
    model = t5()
    model.decoder.embed_tokens = torch.nn.Embedding(VOCAB, 32)
    with pytest.raises(UnsupportedHFConfigError, match="decoder.embed_tokens"):
        from_hf(model)
    from megatron_core.models.t5 import T5Model
    from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec, t5_config

    config = t5_config(num_layers=1, hidden_size=32, num_attention_heads=2, softmax_scale=None)
    ours = T5Model(config, get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec(), vocab_size=VOCAB,
                   max_sequence_length=16)
    with pytest.raises(HFInteropError, match="does not scale its scores"):
        to_hf(ours)
