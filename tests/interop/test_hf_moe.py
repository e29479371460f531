"""Mixtral, Qwen2-MoE and Qwen3-MoE <-> our GPTModel with the MoE spec: logits both ways, exact round trips.

Also: Megatron-Core's per-layer aux loss against Hugging Face's ``load_balancing_loss_func``, and the
configs we cannot represent raising ``UnsupportedHFConfigError``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop import UnsupportedHFConfigError, blueprint_from_hf_config, from_hf
from megatron_core.transformer.moe import TopKRouter

from .parity import batch, check_hf_to_ours_and_back, check_ours_to_hf, perturb_

transformers = pytest.importorskip("transformers")

VOCAB = 71
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              bos_token_id=0, eos_token_id=0, pad_token_id=None)


def mixtral(**overrides) -> torch.nn.Module:
    fields = dict(COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    fields.update(overrides)
    return transformers.MixtralForCausalLM._from_config(transformers.MixtralConfig(**fields), dtype=torch.float32)


def qwen2_moe(**overrides) -> torch.nn.Module:
    fields = dict(COMMON, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                  num_experts=6, num_experts_per_tok=2)
    fields.update(overrides)
    return transformers.Qwen2MoeForCausalLM._from_config(transformers.Qwen2MoeConfig(**fields), dtype=torch.float32)


def qwen3_moe(**overrides) -> torch.nn.Module:
    fields = dict(COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    fields.update(overrides)
    return transformers.Qwen3MoeForCausalLM._from_config(transformers.Qwen3MoeConfig(**fields), dtype=torch.float32)


@pytest.mark.parametrize("case,build", [
    ("mixtral top-2", lambda: mixtral()),
    ("mixtral top-3 tied", lambda: mixtral(num_experts_per_tok=3, tie_word_embeddings=True)),
    ("qwen2_moe shared+gate", lambda: qwen2_moe()),
    ("qwen2_moe norm_topk_prob top-1", lambda: qwen2_moe(norm_topk_prob=False, num_experts_per_tok=1)),
    ("qwen2_moe norm_topk_prob=True", lambda: qwen2_moe(norm_topk_prob=True)),
    ("qwen3_moe", lambda: qwen3_moe()),
    ("qwen3_moe norm_topk_prob=True", lambda: qwen3_moe(norm_topk_prob=True)),
])
def test_moe_families_both_ways(case, build):
    check_hf_to_ours_and_back(case, build(), VOCAB)


def test_our_mixtral_spec_model_to_hf():
    from megatron_core.models.gpt import GPTModel
    from specs.mixtral import MIXTRAL_MODEL_KWARGS, get_mixtral_layer_local_spec, mixtral_config

    config = mixtral_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=40, num_moe_experts=4)
    ours = GPTModel(config, get_mixtral_layer_local_spec(4), vocab_size=VOCAB, max_sequence_length=16,
                    **MIXTRAL_MODEL_KWARGS)
    hf = check_ours_to_hf("ours(mixtral spec) -> mixtral", ours, VOCAB, model_type="mixtral")
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert (hf.config.num_local_experts, hf.config.intermediate_size) == (4, 40)


@pytest.mark.parametrize("build,field", [
    (lambda: mixtral(num_experts_per_tok=1), "num_experts_per_tok"),
    (lambda: mixtral(router_jitter_noise=0.1), "router_jitter_noise"),
    (lambda: mixtral(sliding_window=8), "sliding_window"),
    (lambda: mixtral(hidden_act="gelu"), "hidden_act"),
    (lambda: qwen2_moe(mlp_only_layers=[1]), "mlp_only_layers"),
    (lambda: qwen2_moe(decoder_sparse_step=2), "mlp_only_layers"),
    (lambda: qwen2_moe(norm_topk_prob=True, num_experts_per_tok=1), "norm_topk_prob"),
    (lambda: qwen3_moe(attention_bias=True), "attention_bias"),
])
def test_unrepresentable_moe_configs_are_refused(build, field):
    with pytest.raises(UnsupportedHFConfigError, match=field):
        blueprint_from_hf_config(build().config)


def _hf_aux(router_logits: tuple[torch.Tensor, ...], num_experts: int, topk: int) -> torch.Tensor:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(router_logits, num_experts, topk)


def test_aux_loss_matches_hf_load_balancing_loss_func():
    """Megatron-Core's aux loss is per layer and divided by top-k; HF's pools every layer's tokens.

    Per layer l (T tokens, E experts, scores p, counts c): ours = coeff * E / (k T^2) * sum_e (sum_t p) c_e,
    HF = E * sum_e mean_t(p) * c_e / T, so ours = coeff * HF / k for each layer alone. Over several
    layers HF averages the pooled tokens (mean of products != product of means), so the model's total
    is compared with the sum of HF's function applied to each layer's router logits separately.
    """
    hf = perturb_(mixtral(num_local_experts=4, num_experts_per_tok=2).eval())
    ours = from_hf(hf)
    coeff = 0.37
    routers = [m for m in ours.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.config.moe_aux_loss_coeff = coeff
        router.stats.reset()
    tokens, positions = batch(VOCAB)
    ours.train()  # aux losses are computed in training mode (no dropout in this model)
    ours(tokens, positions, None)
    with torch.no_grad():
        out = hf(input_ids=tokens, position_ids=positions, output_router_logits=True)
    per_layer_hf = [_hf_aux((logits,), 4, 2) for logits in out.router_logits]
    for router, hf_layer in zip(routers, per_layer_hf, strict=True):
        assert router.stats.aux_loss == pytest.approx(coeff * hf_layer.item() / 2, rel=1e-5)
    total = sum(r.stats.aux_loss for r in routers)
    assert total == pytest.approx(coeff * sum(x.item() for x in per_layer_hf) / 2, rel=1e-5)
    pooled = _hf_aux(tuple(out.router_logits), 4, 2).item()  # HF's own number for the whole model
    assert out.aux_loss.item() == pytest.approx(pooled, rel=1e-6)
