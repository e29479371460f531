"""Mixtral: a Llama whose MLPs are mixtures of experts (top-2 of 8 SwiGLU experts, softmax router).

Qwen2-MoE / Qwen3-MoE are the same tree with other config choices (a gated shared expert,
``moe_router_pre_softmax`` when ``norm_topk_prob`` is off, q/k norms for Qwen3).

Example:
    >>> from megatron_core.models.gpt import GPTModel
    >>> from specs.mixtral import MIXTRAL_MODEL_KWARGS, get_mixtral_layer_local_spec, mixtral_config
    >>> config = mixtral_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ...                         ffn_hidden_size=128, num_moe_experts=4)
    >>> model = GPTModel(config, get_mixtral_layer_local_spec(4), vocab_size=128, max_sequence_length=32,
    ...                  **MIXTRAL_MODEL_KWARGS)
"""

from __future__ import annotations

from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.transformer.spec_utils import ModuleSpec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec, llama_config

MIXTRAL_MODEL_KWARGS: dict[str, Any] = dict(LLAMA_MODEL_KWARGS, rotary_base=1_000_000)


def get_mixtral_layer_local_spec(num_experts: int = 8, moe_grouped_gemm: bool = False,
                                 qk_layernorm: bool = False) -> ModuleSpec:
    """The Mixtral layer from local kernels: Llama attention, an MoE MLP of ``num_experts`` experts."""
    return get_llama_layer_local_spec(qk_layernorm, num_experts, moe_grouped_gemm)


def get_qwen3_moe_layer_local_spec(num_experts: int = 128, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """The Qwen3-MoE layer: the Mixtral layer with per-head q/k RMSNorm."""
    return get_mixtral_layer_local_spec(num_experts, moe_grouped_gemm, qk_layernorm=True)


def mixtral_config(**overrides: Any) -> TransformerConfig:
    """A TransformerConfig with Mixtral's defaults (Llama's plus 8 experts, top-2, aux loss 0.02).

    ``moe_ffn_hidden_size`` follows ``ffn_hidden_size`` unless given.
    """
    fields: dict[str, Any] = dict(
        num_moe_experts=8, moe_router_topk=2, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.02, moe_token_dispatcher_type="alltoall",
    )
    fields.update(overrides)
    return llama_config(**fields)
