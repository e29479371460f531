"""BertModel: checkpoint names, norm placement by config, heads, loss, masks, refused settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_core.models.bert import BertModel
from megatron_core.models.common.masks import padding_mask
from specs.bert import bert_config, get_bert_layer_local_spec

VOCAB, B, S = 48, 2, 7


def build(**overrides) -> BertModel:
    model_kwargs = {k: overrides.pop(k) for k in ("add_binary_head", "share_embeddings_and_output_weights")
                    if k in overrides}
    cfg = bert_config(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                      attention_dropout=0.0, **overrides)
    return BertModel(cfg, get_bert_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=S, **model_kwargs).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def test_checkpoint_names_follow_megatron_core_and_norm_placement():
    post = set(build().state_dict())
    for key in ("embedding.tokentype_embeddings.weight", "embedding.layernorm.weight", "pooler.dense.weight",
                "lm_head.dense.weight", "lm_head.layer_norm.bias", "output_layer.bias", "binary_head.weight",
                "encoder.layers.1.self_attention.linear_qkv.weight"):
        assert key in post
    assert "output_layer.weight" not in post and not any("final_layernorm" in k for k in post)
    pre = set(build(layernorm_position="pre", share_embeddings_and_output_weights=False).state_dict())
    assert "encoder.final_layernorm.weight" in pre and "output_layer.weight" in pre
    assert not any(k.startswith("embedding.layernorm") for k in pre)


def test_outputs_loss_and_default_token_types():
    model = build()
    ids, mask = batch()
    logits, binary = model(ids, mask)
    assert logits.shape == (B, S, VOCAB) and binary.shape == (B, 2)
    logits_zeros, _ = model(ids, mask, torch.zeros_like(ids))
    assert torch.equal(logits, logits_zeros)
    labels = torch.randint(0, VOCAB, (B, S))
    loss, binary_again = model(ids, mask, lm_labels=labels)
    want = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").reshape(B, S)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(binary, binary_again)


def test_without_binary_head():
    model = build(add_binary_head=False)
    assert not any(k.startswith(("pooler", "binary_head")) for k in model.state_dict())
    _, binary = model(*batch())
    assert binary is None


def test_padding_mask_conversion():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(padding_mask(mask), torch.tensor([[[[False, False, True]]], [[[False, True, True]]]]))
    assert torch.equal(padding_mask(mask.float()), padding_mask(mask.bool()))
    four_d = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    assert padding_mask(four_d) is four_d and padding_mask(None) is None
    with pytest.raises(ValueError, match=r"expected \[batch, seq\]"):
        padding_mask(torch.ones(2, 3, 3))


def test_unsupported_layouts_are_refused():
    with pytest.raises(NotImplementedError, match="sequence_parallel"):
        BertModel(bert_config(num_layers=1, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=2,
                              sequence_parallel=True), get_bert_layer_local_spec(), VOCAB, S)
    with pytest.raises(NotImplementedError, match="pre_process"):
        BertModel(bert_config(num_layers=1, hidden_size=32, num_attention_heads=4), get_bert_layer_local_spec(),
                  VOCAB, S, post_process=False)
