"""A Megatron-Core 0.19 local-spec GPTModel state dict loads into ours (strict) and gives its logits/loss."""

from __future__ import annotations

import pytest
import torch

from megatron_core import TransformerConfig
from megatron_core.models.gpt import GPTModel
from specs.gpt import get_gpt_layer_local_spec
from tests.paths import MCORE_GPT_FIXTURE as FIXTURE


@pytest.fixture(scope="module")
def fixture_data():
    return torch.load(FIXTURE, weights_only=True)


def _model_from_entry(entry: dict) -> GPTModel:
    config = TransformerConfig(**entry["config"])
    return GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=entry["vocab_size"],
        max_sequence_length=entry["max_sequence_length"],
        position_embedding_type=entry["position_embedding_type"],
        share_embeddings_and_output_weights=entry["share_embeddings_and_output_weights"],
        rotary_base=entry["rotary_base"],
    )


@pytest.mark.parametrize("name", ["gpt_learned_tied", "llama_gqa_rope"])
def test_megatron_core_state_dict_loads_strict_and_matches(fixture_data, name):
    entry = fixture_data[name]
    model = _model_from_entry(entry).eval()
    model.load_state_dict(entry["state_dict"], strict=True)
    s = entry["tokens"].shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        logits = model(entry["tokens"], entry["position_ids"], None)
        logits_masked = model(entry["tokens"], entry["position_ids"], causal)
        loss = model(entry["tokens"], entry["position_ids"], None, labels=entry["labels"])
    logit_diff = (logits - entry["logits"]).abs().max().item()
    loss_diff = (loss - entry["loss"]).abs().max().item()
    print(f"{name}: max |logits diff| = {logit_diff:.3g}, max |loss diff| = {loss_diff:.3g}")
    assert logits.shape == entry["logits"].shape
    assert logit_diff <= 1e-5
    assert loss_diff <= 1e-5
    torch.testing.assert_close(logits_masked, logits, atol=1e-6, rtol=0)


def test_our_state_dict_keys_equal_megatron_core(fixture_data):
    for name in ("gpt_learned_tied", "llama_gqa_rope"):
        entry = fixture_data[name]
        ours = _model_from_entry(entry).state_dict()
        assert list(ours) == list(entry["state_dict"])
        for key, value in entry["state_dict"].items():
            assert ours[key].shape == value.shape, key
