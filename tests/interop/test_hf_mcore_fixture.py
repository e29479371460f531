"""Our converters against real Megatron-Core weights (no GPTModel of ours involved).

The fixture holds state dicts and logits from Megatron-Core 0.19.2 local-spec GPTs. Converting
them to Hugging Face layouts and running the Hugging Face model must give Megatron-Core's logits:
this checks the QKV / fc1 layouts against the original independently of our transformer.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop import get_family
from megatron_core.interop.registry import Blueprint

pytest.importorskip("transformers")

from tests.paths import MCORE_GPT_FIXTURE as FIXTURE  # noqa: E402

CASES = [("gpt_learned_tied", "gpt2"), ("llama_gqa_rope", "llama")]


@pytest.fixture(scope="module")
def fixture_data():
    return torch.load(FIXTURE, weights_only=True)


def _blueprint(entry: dict, model_type: str) -> Blueprint:
    fields = dict(entry["config"])
    if fields.get("gated_linear_unit") and fields["activation_func"] == "silu":
        fields["activation_func"] = "swiglu"
    kwargs = {k: entry[k] for k in ("vocab_size", "max_sequence_length", "position_embedding_type",
                                    "share_embeddings_and_output_weights")}
    if entry["position_embedding_type"] == "rope":
        kwargs.update(rotary_percent=1.0, rotary_base=entry["rotary_base"])
    return Blueprint(model_type, TransformerConfig(**fields), kwargs)


@pytest.mark.parametrize("name,model_type", CASES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mcore_weights_in_hf_give_mcore_logits(fixture_data, name, model_type, attn):
    entry = fixture_data[name]
    family = get_family(model_type)
    blueprint = _blueprint(entry, model_type)
    assert family.unsupported_reason(blueprint) is None
    hf = family.build_hf_model(family.hf_config_from(blueprint), dtype=torch.float32, attn_implementation=attn)
    hf.load_state_dict(family.state_dict_to_hf(entry["state_dict"], blueprint), strict=True)
    with torch.no_grad():
        logits = hf.eval()(input_ids=entry["tokens"], position_ids=entry["position_ids"]).logits
    diff = (logits - entry["logits"]).abs().max().item()
    assert diff <= 1e-5, f"{name} via HF ({attn}): max |logits diff| = {diff}"

    back = family.state_dict_from_hf(hf.state_dict(), blueprint)
    assert back.keys() == entry["state_dict"].keys()
    for key, tensor in back.items():
        assert torch.equal(tensor, entry["state_dict"][key]), key
