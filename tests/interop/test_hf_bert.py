"""BERT (BertForPreTraining, BertForMaskedLM) <-> our BertModel: MLM, NSP and pooled outputs with padding, both ways."""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import HFInteropError, UnsupportedHFConfigError, from_hf, to_hf

from .parity import perturb_, record

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ = 83, 3, 11


def bert(attn: str = "eager", **overrides) -> torch.nn.Module:
    fields = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                  max_position_embeddings=16, type_vocab_size=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    config = transformers.BertConfig(**fields)
    return transformers.BertForPreTraining._from_config(config, attn_implementation=attn, dtype=torch.float32)


def inputs(num_types: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), "attention_mask": mask,
            "token_type_ids": torch.randint(0, num_types, (BATCH, SEQ), generator=g)}


def compare(case: str, ours: torch.nn.Module, hf: torch.nn.Module, x: dict[str, torch.Tensor]) -> None:
    """MLM logits, NSP logits and the pooled output of both models agree (every position, pads included)."""
    with torch.no_grad():
        out = hf(**x)
        pooled_hf = hf.bert(**x).pooler_output
        logits, binary = ours(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        pooled = ours.pooler(ours.encode(x["input_ids"], x["attention_mask"], x["token_type_ids"]))
    record(f"{case} MLM logits", logits, out.prediction_logits)
    record(f"{case} NSP logits", binary, out.seq_relationship_logits)
    record(f"{case} pooled", pooled, pooled_hf)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], case: str) -> None:
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{case}: {key} differs after the round trip"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_tied_both_ways(attn):
    hf = perturb_(bert(attn).eval())
    ours = from_hf(hf)
    assert ours.share_embeddings_and_output_weights and ours.config.layernorm_position == "post"
    compare(f"bert tied {attn}", ours, hf, inputs())
    back = to_hf(ours)
    assert type(back).__name__ == "BertForPreTraining"
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    assert_same_state(back.state_dict(), hf.state_dict(), "bert tied")


def test_bert_untied_relu_both_ways():
    hf = perturb_(bert(tie_word_embeddings=False, hidden_act="relu", layer_norm_eps=1e-6).eval())
    # Untied, Hugging Face keeps cls.predictions.bias apart and never reads it; to_hf writes the
    # decoder's bias there, so give it that value for an exact round trip.
    with torch.no_grad():
        hf.cls.predictions.bias.copy_(hf.cls.predictions.decoder.bias)
    ours = from_hf(hf)
    assert not ours.share_embeddings_and_output_weights and ours.config.activation_func == "relu"
    compare("bert untied relu", ours, hf, inputs())
    assert_same_state(to_hf(ours).state_dict(), hf.state_dict(), "bert untied")


def test_bert_for_masked_lm_both_ways():
    config = bert().config
    hf = perturb_(transformers.BertForMaskedLM._from_config(config, attn_implementation="sdpa").eval())
    ours = from_hf(hf)
    assert not ours.add_binary_head and ours.pooler is None
    x = inputs()
    with torch.no_grad():
        logits, binary = ours(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        record("bert masked-lm MLM logits", logits, hf(**x).logits)
    assert binary is None
    back = to_hf(ours)
    assert type(back).__name__ == "BertForMaskedLM"
    assert_same_state(back.state_dict(), hf.state_dict(), "bert masked-lm")


def test_our_bert_from_spec_to_hf_and_back():
    from megatron_core.models.bert import BertModel
    from specs.bert import bert_config, get_bert_layer_local_spec

    config = bert_config(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                         hidden_dropout=0.0, attention_dropout=0.0)
    ours = perturb_(BertModel(config, get_bert_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                              num_tokentypes=2).eval())
    hf = to_hf(ours, attn_implementation="sdpa").eval()
    assert hf.config.type_vocab_size == 2 and hf.config.layer_norm_eps == 1e-12
    compare("ours(bert spec) -> bert", ours, hf, inputs(num_types=2))
    assert_same_state(from_hf(hf).state_dict(), ours.state_dict(), "ours -> bert -> ours")


def test_padding_changes_nothing_at_real_tokens():
    hf = perturb_(bert().eval())
    ours = from_hf(hf)
    x = inputs()
    other = dict(x, input_ids=x["input_ids"].masked_fill(x["attention_mask"] == 0, 5))
    with torch.no_grad():
        a, _ = ours(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        b, _ = ours(other["input_ids"], other["attention_mask"], other["token_type_ids"])
    real = x["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)


def test_unrepresentable_bert_is_refused():
    with pytest.raises(UnsupportedHFConfigError, match="is_decoder"):
        from_hf(bert(is_decoder=True))
    from megatron_core.models.bert import BertModel
    from specs.bert import bert_config, get_bert_layer_local_spec

    prenorm = BertModel(bert_config(num_layers=1, hidden_size=32, num_attention_heads=2, layernorm_position="pre"),
                        get_bert_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=8)
    with pytest.raises(HFInteropError, match="post-norm"):
        to_hf(prenorm, model_type="bert")
    with pytest.raises(HFInteropError, match="BertForPreTraining"):
        from_hf(transformers.BertForSequenceClassification(bert().config))
