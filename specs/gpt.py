"""Ready-made GPT layer specs.

``get_gpt_layer_local_spec()`` builds every slot from the local (pure PyTorch) kernels:
``ColumnParallelLinear`` / ``RowParallelLinear`` / ``DotProductAttention`` and the local norms.
The resulting parameter names and layouts are Megatron-Core's local spec's.

Example:
    >>> from megatron_core import TransformerConfig
    >>> from megatron_core.models.gpt import GPTModel
    >>> from specs.gpt import get_gpt_layer_local_spec
    >>> config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    >>> model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=32)
"""

from __future__ import annotations

from typing import Literal

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.norms import LayerNorm, RMSNorm, WrappedNorm
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from specs.backends import get_gpt_layer_spec, get_gpt_layer_te_spec  # noqa: F401  (re-exported: the TE spec and the backend switch)


def _norm_for(normalization: Literal["LayerNorm", "RMSNorm"] | None) -> type:
    if normalization is None:
        return WrappedNorm  # decided by config.normalization at build time
    if normalization == "LayerNorm":
        return LayerNorm
    if normalization == "RMSNorm":
        return RMSNorm
    raise ValueError(f"normalization={normalization!r}; use 'LayerNorm', 'RMSNorm' or None (take the config's)")


def get_mlp_local_spec() -> ModuleSpec:
    """The dense MLP with local column/row-parallel linears."""
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                            linear_fc2=RowParallelLinear))


def get_gpt_layer_local_spec(
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: Literal["LayerNorm", "RMSNorm"] | None = None,
) -> ModuleSpec:
    """A causal self-attention + MLP layer from local kernels.

    Args:
        num_experts: mixture-of-experts layers are not available yet; must be None.
        moe_grouped_gemm: MoE option; must be False.
        qk_layernorm: normalise queries and keys per head before attention.
        normalization: pin the norm class; None lets ``config.normalization`` decide (recommended).

    Returns:
        A ``ModuleSpec`` of ``TransformerLayer`` for ``GPTModel(config, spec, ...)``.
    """
    if num_experts is not None or moe_grouped_gemm:
        raise NotImplementedError(
            f"num_experts={num_experts}, moe_grouped_gemm={moe_grouped_gemm}: mixture-of-experts layers are not "
            "implemented yet; leave num_experts=None"
        )
    norm = _norm_for(normalization)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=norm if qk_layernorm else IdentityOp,
                    k_layernorm=norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_local_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )
