"""Llama: the GPT layer tree, with Llama's choices in the config (RMSNorm, SwiGLU, GQA, no biases)
and in the model arguments (RoPE, untied output layer).

Example:
    >>> from megatron_core.models.gpt import GPTModel
    >>> from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec, llama_config
    >>> config = llama_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ...                       ffn_hidden_size=176)
    >>> model = GPTModel(config, get_llama_layer_local_spec(), vocab_size=128, max_sequence_length=32,
    ...                  **LLAMA_MODEL_KWARGS)
"""

from __future__ import annotations

from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_usability import require_te
from megatron_core.transformer.spec_utils import ModuleSpec
from specs.common import Backend, resolve_backend
from specs.gpt import get_gpt_layer_local_spec, get_gpt_layer_te_spec

# GPTModel arguments that make a GPT a Llama (positions and head are model choices, not config).
LLAMA_MODEL_KWARGS: dict[str, Any] = {
    "position_embedding_type": "rope",
    "share_embeddings_and_output_weights": False,
    "rotary_base": 10000,
}


def get_llama_layer_local_spec(
    qk_layernorm: bool = False, num_experts: int | None = None, moe_grouped_gemm: bool = False
) -> ModuleSpec:
    """The Llama layer from local kernels: the GPT layer with config-chosen norms.

    Args:
        qk_layernorm: normalise queries and keys per head (not in Llama 2/3; some derivatives use it).
        num_experts: an MoE MLP (Mixtral / Qwen-MoE; see ``specs.mixtral``); None for the dense MLP.
        moe_grouped_gemm: grouped-GEMM experts (``GroupedMLP``).
    """
    return get_gpt_layer_local_spec(num_experts, moe_grouped_gemm, qk_layernorm=qk_layernorm, normalization=None)


def get_llama_layer_te_spec(
    qk_layernorm: bool = False, use_te_activation_func: bool = False, check_te: bool = True
) -> ModuleSpec:
    """The Llama layer from TE kernels: the GPT TE layer, norms chosen by the config (RMSNorm for Llama).

    Args:
        qk_layernorm: normalise queries and keys per head.
        use_te_activation_func: fused TE SwiGLU in the MLP.
        check_te: raise now when TE is not usable (see ``get_gpt_layer_te_spec``).

    Raises:
        TEUnavailableError: TE is not usable here.
    """
    if check_te:
        require_te("get_llama_layer_te_spec()")
    return get_gpt_layer_te_spec(qk_layernorm=qk_layernorm, use_te_activation_func=use_te_activation_func,
                                 check_te=False)


def get_llama_layer_spec(
    backend: Backend = "auto", *, qk_layernorm: bool = False, use_te_activation_func: bool = False
) -> ModuleSpec:
    """The Llama layer spec for a backend: ``"te"``, ``"local"``, or ``"auto"`` (TE only when usable).

    Raises:
        TEUnavailableError: ``backend="te"`` and TE is not usable here.
    """
    if resolve_backend(backend) == "te":
        return get_llama_layer_te_spec(qk_layernorm, use_te_activation_func)
    return get_llama_layer_local_spec(qk_layernorm)


def llama_config(**overrides: Any) -> TransformerConfig:
    """A TransformerConfig with Llama's defaults; any field can be overridden.

    Defaults: RMSNorm (eps 1e-5), SwiGLU, no linear biases, no dropout, unscaled output init. Sizes
    (num_layers, hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size) come from
    ``overrides``.
    """
    fields: dict[str, Any] = dict(
        normalization="RMSNorm",
        activation_func="swiglu",
        gated_linear_unit=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
