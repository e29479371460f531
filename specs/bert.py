"""BERT: the GPT layer tree with bidirectional (padding-masked) self-attention.

The original BERT's post-norm placement is a config choice (``layernorm_position="post"``), not a
different layer: the same slots hold the norms. ``bert_config`` sets it with BERT's other defaults.

Example:
    >>> from megatron_core.models.bert import BertModel
    >>> from specs.bert import bert_config, get_bert_layer_local_spec
    >>> config = bert_config(num_layers=2, hidden_size=64, num_attention_heads=4)
    >>> model = BertModel(config, get_bert_layer_local_spec(), vocab_size=128, max_sequence_length=32)
"""

from __future__ import annotations

from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_usability import require_te
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.norms import WrappedNorm
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from specs.common import TE_NORM, Backend, resolve_backend, te_mlp, te_self_attention
from specs.gpt import get_mlp_local_spec


def get_bert_layer_local_spec() -> ModuleSpec:
    """A bidirectional self-attention + MLP layer from local kernels (norm class from the config).

    Returns:
        A ``ModuleSpec`` of ``TransformerLayer`` for ``BertModel(config, spec, ...)``.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedNorm,
            mlp=get_mlp_local_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_bert_layer_te_spec(check_te: bool = True) -> ModuleSpec:
    """The BERT layer from TE kernels, norms kept separate (``TENorm``): BERT's post-norm layers
    normalise *after* each sublayer, so the norms cannot be fused into the next linear.

    Raises:
        TEUnavailableError: ``check_te`` and TE is not usable here.
    """
    if check_te:
        require_te("get_bert_layer_te_spec()")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=ModuleSpec(module=TE_NORM),
            self_attention=te_self_attention(AttnMaskType.padding, fused_norm=False),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ModuleSpec(module=TE_NORM),
            mlp=te_mlp(fused_norm=False, use_te_activation_func=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_bert_layer_spec(backend: Backend = "auto") -> ModuleSpec:
    """The BERT layer spec for a backend: ``"te"``, ``"local"``, or ``"auto"`` (TE only when usable)."""
    if resolve_backend(backend) == "te":
        return get_bert_layer_te_spec()
    return get_bert_layer_local_spec()


def bert_config(**overrides: Any) -> TransformerConfig:
    """A TransformerConfig with the original BERT's defaults; any field can be overridden.

    Defaults: post-norm LayerNorm (eps 1e-12), exact GELU, biases on every linear, dropout 0.1,
    init std 0.02 (unscaled output layers, as BERT initialises every linear alike).
    """
    fields: dict[str, Any] = dict(
        normalization="LayerNorm",
        layernorm_position="post",
        layernorm_epsilon=1e-12,
        activation_func="gelu",
        add_bias_linear=True,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        init_method_std=0.02,
        use_scaled_init_method=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
