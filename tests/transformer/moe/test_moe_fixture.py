"""Megatron-Core 0.19.2 MoE GPTs (local spec, TopKRouter + SequentialMLP) load strict and match.

The fixture (``tests/fixtures/mcore_moe_local_spec.pt``, see tests/fixtures/README.md) holds the state
dicts, configs, one batch, Megatron-Core's logits / per-token loss and its per-layer routing.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.transformer.moe import TopKRouter
from specs.gpt import get_gpt_layer_local_spec
from tests.paths import MCORE_MOE_FIXTURE

NAMES = ["mixtral_like", "shared_expert"]


@pytest.fixture(scope="module")
def fixture_data():
    return torch.load(MCORE_MOE_FIXTURE, weights_only=True)


def _config(entry: dict) -> TransformerConfig:
    # Megatron-Core fields we do not have are kernel/fusion switches, all off here (or 1 / None).
    ours = {k: v for k, v in entry["config"].items() if k in TransformerConfig.model_fields}
    return TransformerConfig(**ours)


def _model(entry: dict, grouped: bool = False) -> GPTModel:
    config = _config(entry)
    return GPTModel(config, get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=grouped),
                    vocab_size=entry["vocab_size"], max_sequence_length=entry["max_sequence_length"],
                    position_embedding_type=entry["position_embedding_type"],
                    share_embeddings_and_output_weights=entry["share_embeddings_and_output_weights"],
                    rotary_base=entry["rotary_base"], rotary_percent=entry["rotary_percent"])


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_mcore_moe_state_dict_loads_strict_and_matches(fixture_data, name, grouped):
    entry = fixture_data[name]
    model = _model(entry, grouped).eval()
    assert list(model.state_dict()) == list(entry["state_dict"])  # same names, same order
    model.load_state_dict(entry["state_dict"], strict=True)
    routing: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(lambda m, i, o: routing.append((o[0].detach(), o[1].detach())))
    with torch.no_grad():
        logits = model(entry["tokens"], entry["position_ids"], None)
        loss = model(entry["tokens"], entry["position_ids"], None, labels=entry["labels"])
    assert (logits - entry["logits"]).abs().max().item() <= 1e-5
    assert (loss - entry["loss"]).abs().max().item() <= 1e-5
    b, s = entry["tokens"].shape
    for layer, (probs, routing_map) in enumerate(routing[:2]):
        ref = entry["routing"][layer]
        # ours are [s*b, E] (Megatron's token order); the fixture's [b, s, E]
        assert torch.equal(routing_map.view(s, b, -1).transpose(0, 1), ref["routing_map"].bool())
        torch.testing.assert_close(probs.view(s, b, -1).transpose(0, 1), ref["probs"], atol=1e-6, rtol=0)
        assert routing_map.sum(0).tolist() == entry["tokens_per_expert"][layer]
