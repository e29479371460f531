"""T5: encoder and decoder layer specs from local kernels, and T5's config defaults.

The encoder layer is the bidirectional (padding-masked) self-attention + MLP layer; the decoder
layer adds cross-attention to the encoder's output through ``CrossAttention`` in the
``cross_attention`` slot, between causal self-attention and the MLP. T5's other choices live in
the config (RMSNorm without bias, no linear biases, unscaled attention, relu or gated-gelu MLP)
and in the model (relative position bias per stack, tied head scaled by ``hidden_size**-0.5``).

Example:
    >>> from megatron_core.models.t5 import T5Model
    >>> from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec, t5_config
    >>> config = t5_config(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=128)
    >>> model = T5Model(config, get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec(),
    ...                 vocab_size=128, max_sequence_length=64)
"""

from __future__ import annotations

from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_usability import require_te
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.norms import WrappedNorm
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from specs.common import (
    TE_COLUMN_PARALLEL_LINEAR,
    TE_DOT_PRODUCT_ATTENTION,
    TE_LAYERNORM_LINEAR,
    TE_ROW_PARALLEL_LINEAR,
    Backend,
    resolve_backend,
    te_mlp,
    te_self_attention,
)
from specs.gpt import get_mlp_local_spec


def _self_attention(mask_type: AttnMaskType) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention, linear_proj=RowParallelLinear,
        ),
    )


def get_t5_encoder_layer_local_spec() -> ModuleSpec:
    """The T5 encoder layer: bidirectional self-attention + MLP, pre-norm (norm class from the config)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedNorm,
            self_attention=_self_attention(AttnMaskType.padding),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedNorm,
            mlp=get_mlp_local_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_t5_decoder_layer_local_spec() -> ModuleSpec:
    """The T5 decoder layer: causal self-attention, cross-attention to the encoder, MLP; pre-norm."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedNorm,
            self_attention=_self_attention(AttnMaskType.causal),
            self_attn_bda=get_bias_dropout_add,
            pre_cross_attn_layernorm=WrappedNorm,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=CrossAttentionSubmodules(
                    linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
                    core_attention=DotProductAttention, linear_proj=RowParallelLinear,
                ),
            ),
            cross_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedNorm,
            mlp=get_mlp_local_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_t5_encoder_layer_te_spec(check_te: bool = True) -> ModuleSpec:
    """The T5 encoder layer from TE kernels: bidirectional self-attention + MLP, norms fused (pre-norm).

    Raises:
        TEUnavailableError: ``check_te`` and TE is not usable here.
    """
    if check_te:
        require_te("get_t5_encoder_layer_te_spec()")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=te_self_attention(AttnMaskType.padding, fused_norm=True),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=te_mlp(fused_norm=True, use_te_activation_func=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_t5_decoder_layer_te_spec(check_te: bool = True) -> ModuleSpec:
    """The T5 decoder layer from TE kernels; the cross-attention norm is fused into ``linear_q``
    (it normalises the queries' input only; keys/values come from the encoder output as they are).

    Raises:
        TEUnavailableError: ``check_te`` and TE is not usable here.
    """
    if check_te:
        require_te("get_t5_decoder_layer_te_spec()")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=te_self_attention(AttnMaskType.causal, fused_norm=True),
            self_attn_bda=get_bias_dropout_add,
            pre_cross_attn_layernorm=IdentityOp,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=CrossAttentionSubmodules(
                    linear_q=ModuleSpec(module=TE_LAYERNORM_LINEAR),
                    linear_kv=ModuleSpec(module=TE_COLUMN_PARALLEL_LINEAR),
                    core_attention=ModuleSpec(module=TE_DOT_PRODUCT_ATTENTION),
                    linear_proj=ModuleSpec(module=TE_ROW_PARALLEL_LINEAR),
                ),
            ),
            cross_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=te_mlp(fused_norm=True, use_te_activation_func=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_t5_layer_specs(backend: Backend = "auto") -> tuple[ModuleSpec, ModuleSpec]:
    """(encoder layer spec, decoder layer spec) for a backend: ``"te"``, ``"local"`` or ``"auto"``."""
    if resolve_backend(backend) == "te":
        require_te("get_t5_layer_specs(backend='te')")
        return get_t5_encoder_layer_te_spec(check_te=False), get_t5_decoder_layer_te_spec(check_te=False)
    return get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec()


def t5_config(version: str = "1.0", **overrides: Any) -> TransformerConfig:
    """A TransformerConfig with T5's defaults; any field can be overridden.

    Args:
        version: ``"1.0"`` (relu MLP) or ``"1.1"`` (gated-gelu MLP: tanh-GELU gate times a linear unit).
        **overrides: TransformerConfig fields (sizes at least).

    Defaults: RMSNorm (eps 1e-6), no linear biases, attention scores unscaled (``softmax_scale=1``:
    T5 folds the scale into its initialisation), dropout 0.1, unscaled output-layer init.
    """
    if version not in ("1.0", "1.1"):
        raise ValueError(f"t5_config: version={version!r}; use '1.0' (relu) or '1.1' (gated-gelu)")
    fields: dict[str, Any] = dict(
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        add_bias_linear=False,
        softmax_scale=1.0,
        activation_func="relu" if version == "1.0" else "gelu_tanh",
        gated_linear_unit=version == "1.1",
        hidden_dropout=0.1,
        attention_dropout=0.1,
        use_scaled_init_method=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
