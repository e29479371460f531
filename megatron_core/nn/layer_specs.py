"""Specs and configs behind the drop-in ``torch.nn`` transformer layers.

Each drop-in layer is the toolkit's generic ``TransformerLayer`` (or ``SelfAttention``) built from a
``ModuleSpec`` below and a ``TransformerConfig`` made from torch.nn's constructor arguments:

* post-norm (``norm_first=False``, torch's default) is ``layernorm_position="post"``;
* torch's ``dropout`` is the attention dropout, the residual (bias-dropout-add) dropout and the
  dropout inside the feed-forward block (``ActivationDropout`` in the MLP's activation slot);
* ``bias=False`` drops the biases of every linear and of the norms, as in torch.

The specs are ordinary ``ModuleSpec`` trees: print them, or copy one and swap a slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.nn._base import dtype_name, tp_size
from megatron_core.nn.activation import ActivationDropout
from megatron_core.nn.masks import AttentionMasks
from megatron_core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.norms import LayerNorm
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


class LayerNormWithoutBias(LayerNorm):
    """``torch.nn.LayerNorm(..., bias=False)``: a scale only."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps)
        self.register_parameter("bias", None)


class TorchCrossAttention(CrossAttention):
    """``CrossAttention`` whose mask may carry an additive bias too (``AttentionMasks``).

    ``TransformerLayer`` hands the cross-attention only ``context_mask``; torch.nn's float memory
    masks travel inside it as ``AttentionMasks(mask, bias)``.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any, key_value_states: torch.Tensor | None = None,
                inference_params: Any = None, rotary_pos_emb: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(attention_mask, AttentionMasks):
            attention_mask, attention_bias = attention_mask.mask, attention_mask.bias
        return super().forward(hidden_states, attention_mask, key_value_states, inference_params, rotary_pos_emb,
                               attention_bias, packed_seq_params)


def torch_layer_config(
    d_model: int, nhead: int, dim_feedforward: int | None = None, dropout: float = 0.1,
    activation_name: str | None = "relu", layer_norm_eps: float = 1e-5, norm_first: bool = False,
    bias: bool = True, dtype: torch.dtype | None = None, hidden_dropout: float | None = None,
) -> TransformerConfig:
    """The TransformerConfig of one drop-in layer (TP size taken from ``parallel_state``).

    Weights are not initialised here (``perform_initialization=False``): the drop-in layers copy
    ``torch.nn``'s own initialisation instead. An activation outside the registry keeps the config's
    default name; the callable itself lives in the MLP's activation slot.
    """
    return TransformerConfig(
        num_layers=1, hidden_size=d_model, num_attention_heads=nhead,
        ffn_hidden_size=dim_feedforward if dim_feedforward is not None else tp_size(),
        hidden_dropout=dropout if hidden_dropout is None else hidden_dropout, attention_dropout=dropout,
        layernorm_epsilon=layer_norm_eps, layernorm_position="pre" if norm_first else "post",
        add_bias_linear=bias, add_qkv_bias=bias, activation_func=activation_name or "gelu",
        params_dtype=dtype_name(dtype), perform_initialization=False,
        tensor_model_parallel_size=tp_size(),
        bias_dropout_fusion=False,  # the residual dropout through F.dropout, as torch.nn's layers do it
    )


def _norm(bias: bool) -> type:
    return LayerNorm if bias else LayerNormWithoutBias


def self_attention_spec() -> ModuleSpec:
    """Fused-QKV self-attention from the local column/row-parallel linears (no implicit causal mask)."""
    return ModuleSpec(
        module=SelfAttention, params={"attn_mask_type": AttnMaskType.padding},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                           linear_proj=RowParallelLinear),
    )


def cross_attention_spec() -> ModuleSpec:
    """Cross-attention (queries from the decoder, keys/values from the memory)."""
    return ModuleSpec(
        module=TorchCrossAttention, params={"attn_mask_type": AttnMaskType.padding},
        submodules=CrossAttentionSubmodules(linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
                                            core_attention=DotProductAttention, linear_proj=RowParallelLinear),
    )


def mlp_spec(activation: Callable[[torch.Tensor], torch.Tensor], dropout: float) -> ModuleSpec:
    """``linear_fc2(dropout(activation(linear_fc1(x))))``, split over TP along the ffn dimension."""
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear,
        activation_func=ModuleSpec(module=ActivationDropout, params={"activation": activation, "dropout": dropout}),
    ))


def encoder_layer_spec(activation: Callable[[torch.Tensor], torch.Tensor], dropout: float,
                       bias: bool = True) -> ModuleSpec:
    """``torch.nn.TransformerEncoderLayer`` as a ``TransformerLayer`` spec."""
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=_norm(bias), self_attention=self_attention_spec(), self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=_norm(bias), mlp=mlp_spec(activation, dropout), mlp_bda=get_bias_dropout_add,
    ))


def decoder_layer_spec(activation: Callable[[torch.Tensor], torch.Tensor], dropout: float,
                       bias: bool = True) -> ModuleSpec:
    """``torch.nn.TransformerDecoderLayer`` as a ``TransformerLayer`` spec (self-, cross-attention, MLP)."""
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=_norm(bias), self_attention=self_attention_spec(), self_attn_bda=get_bias_dropout_add,
        pre_cross_attn_layernorm=_norm(bias), cross_attention=cross_attention_spec(),
        cross_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=_norm(bias), mlp=mlp_spec(activation, dropout), mlp_bda=get_bias_dropout_add,
    ))
