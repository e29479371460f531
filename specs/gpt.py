"""Ready-made GPT layer specs.

``get_gpt_layer_local_spec()`` builds every slot from the local (pure PyTorch) kernels:
``ColumnParallelLinear`` / ``RowParallelLinear`` / ``ContextParallelDotProductAttention`` (SDPA; ring
attention under context parallelism) and the local norms.
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

from megatron_core.config import TransformerConfig
from megatron_core.config_moe import moe_layer_pattern
from megatron_core.extensions.te_usability import require_te
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.context_parallel import ContextParallelDotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.norms import LayerNorm, RMSNorm, WrappedNorm
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from specs.common import (
    TE_NORM,
    Backend,
    Normalization,
    norm_params,
    resolve_backend,
    te_mlp,
    te_self_attention,
)
from specs.moe import get_moe_module_spec


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
        num_experts: an MoE layer (``MoELayer``: router, experts, shared expert) in the ``mlp`` slot;
            the count itself comes from ``config.num_moe_experts`` (as in Megatron-Core).
        moe_grouped_gemm: ``GroupedMLP`` experts instead of ``SequentialMLP``.
        qk_layernorm: normalise queries and keys per head before attention.
        normalization: pin the norm class; None lets ``config.normalization`` decide (recommended).

    Returns:
        A ``ModuleSpec`` of ``TransformerLayer`` for ``GPTModel(config, spec, ...)``.
    """
    if moe_grouped_gemm and num_experts is None:
        raise ValueError("moe_grouped_gemm=True needs num_experts: grouped GEMMs only apply to MoE experts")
    norm = _norm_for(normalization)
    mlp = get_moe_module_spec(moe_grouped_gemm) if num_experts is not None else get_mlp_local_spec()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    # DotProductAttention at CP=1; ring attention when the sequence is split (CP>1).
                    core_attention=ContextParallelDotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=norm if qk_layernorm else IdentityOp,
                    k_layernorm=norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_gpt_layer_te_spec(
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: Normalization = None,
    use_te_activation_func: bool = False,
    check_te: bool = True,
) -> ModuleSpec:
    """A causal self-attention + MLP layer from Transformer Engine kernels (pre-norm layers only).

    Args:
        num_experts: an MoE layer in the ``mlp`` slot (``SequentialMLP`` experts and shared expert from
            ``TEColumnParallelLinear`` / ``TERowParallelLinear``, the local ``TopKRouter``); the pre-MLP
            norm is then a ``TENorm`` of its own (the router reads the normalised input), not fused.
        moe_grouped_gemm: must be False (no TE grouped-GEMM experts here).
        qk_layernorm: normalise queries and keys per head before attention (``TENorm``).
        normalization: pin the fused norms to "LayerNorm" or "RMSNorm"; None follows
            ``config.normalization`` (recommended).
        use_te_activation_func: put a fused TE activation op in the MLP (``TEActivationOp``); its
            activation must have an exact TE twin (not exact-erf "gelu"/"geglu").
        check_te: raise now when TE is not usable. ``False`` only builds the spec (e.g. to write it
            to YAML on a CPU machine); building a model from it still needs TE.

    Returns:
        A ``ModuleSpec`` of ``TransformerLayer`` for ``GPTModel(config, spec, ...)``.

    Raises:
        TEUnavailableError: TE is not usable here (message names what is missing and the local spec).
    """
    if check_te:
        require_te("get_gpt_layer_te_spec()")
    if moe_grouped_gemm and num_experts is None:
        raise ValueError("moe_grouped_gemm=True needs num_experts: grouped GEMMs only apply to MoE experts")
    moe = num_experts is not None
    if moe and use_te_activation_func:
        raise NotImplementedError("get_gpt_layer_te_spec(num_experts=..., use_te_activation_func=True): the MoE "
                                  "experts apply config.activation_func themselves; leave use_te_activation_func=False")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=te_self_attention(AttnMaskType.causal, True, qk_layernorm, normalization),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ModuleSpec(module=TE_NORM, params=norm_params(normalization)) if moe else IdentityOp,
            mlp=get_moe_module_spec(moe_grouped_gemm, use_te=True) if moe
            else te_mlp(True, use_te_activation_func, normalization),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_gpt_layer_spec(
    backend: Backend = "auto",
    *,
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: Normalization = None,
    use_te_activation_func: bool = False,
) -> ModuleSpec:
    """The GPT layer spec for a backend: ``"te"``, ``"local"``, or ``"auto"`` (TE only when usable).

    Both backends build the same model with the same checkpoint keys. ``use_te_activation_func``
    only applies to the TE spec (the local spec always uses the local activation).

    Raises:
        TEUnavailableError: ``backend="te"`` and TE is not usable here.
    """
    chosen = resolve_backend(backend)
    if chosen == "te":
        return get_gpt_layer_te_spec(num_experts, moe_grouped_gemm, qk_layernorm, normalization,
                                     use_te_activation_func)
    return get_gpt_layer_local_spec(num_experts, moe_grouped_gemm, qk_layernorm, normalization)


def get_gpt_decoder_block_spec(
    config: TransformerConfig, use_transformer_engine: bool = False,
    normalization: Literal["LayerNorm", "RMSNorm"] | None = None, qk_layernorm: bool = False,
) -> TransformerBlockSubmodules:
    """One layer spec per layer of this pipeline stage: MoE where ``config.moe_layer_freq`` says, else dense.

    Megatron-Core's function of the same name, with local kernels only.

    Raises:
        ValueError: ``use_transformer_engine=True`` (no TE MoE spec yet).
    """
    if use_transformer_engine:
        raise ValueError("use_transformer_engine=True: MoE layers have local specs only; pass False")
    dense = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    moe = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, qk_layernorm, normalization) \
        if config.num_moe_experts is not None else dense
    pattern = moe_layer_pattern(config)
    offset = get_transformer_layer_offset(config)
    layers = [moe if pattern[offset + i] else dense for i in range(get_num_layers_to_build(config))]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=_norm_for(normalization))
