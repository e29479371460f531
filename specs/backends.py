"""Transformer Engine layer specs, and the backend switch between them and the local specs.

The TE spec is the local spec's tree with TE kernels in the slots:

=====================================  ====================================  ==========================================
slot                                    local spec                            TE spec
=====================================  ====================================  ==========================================
``input_layernorm``                     LayerNorm / RMSNorm                   ``IdentityOp`` (fused into ``linear_qkv``)
``self_attention.linear_qkv``           ``ColumnParallelLinear``              ``TELayerNormColumnParallelLinear``
``self_attention.core_attention``       ``DotProductAttention`` (SDPA)        ``TEDotProductAttention``
``self_attention.linear_proj``          ``RowParallelLinear``                 ``TERowParallelLinear``
``self_attention.q/k_layernorm``        LayerNorm / RMSNorm (if asked)        ``TENorm`` (if asked)
``pre_mlp_layernorm``                   LayerNorm / RMSNorm                   ``IdentityOp`` (fused into ``linear_fc1``)
``mlp.linear_fc1`` / ``linear_fc2``     Column / ``RowParallelLinear``        ``TELayerNormColumnParallelLinear`` / ``TERowParallelLinear``
``mlp.activation_func``                 ``config.activation_func``            same, or a fused TE op (``use_te_activation_func``)
=====================================  ====================================  ==========================================

BERT's TE spec keeps its norms separate (``TENorm``: post-norm layers cannot fuse them); T5's fuses
them, the cross-attention norm into ``cross_attention.linear_q``. Every spec gives the same
checkpoint keys, shapes and layouts as its local twin, so a checkpoint saved with one loads
into the other (``model.state_dict()`` names differ; see ``megatron_core.extensions.te_key_map``).
TE classes are named by dotted path, so this module imports on any machine; asking for a TE spec
where TE is not usable raises ``TEUnavailableError`` naming what is missing.

Example, the one-line swap::

    spec = get_gpt_layer_spec(backend="auto")   # TE on a GPU with TE installed, else local
    model = GPTModel(config, spec, vocab_size=50304, max_sequence_length=2048)
"""

from __future__ import annotations

import logging
from typing import Literal

from megatron_core.extensions.te_usability import is_te_usable, require_te
from megatron_core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

logger = logging.getLogger(__name__)

Backend = Literal["auto", "te", "local"]
Normalization = Literal["LayerNorm", "RMSNorm"] | None

_TE = "megatron_core.extensions.transformer_engine."
TE_LAYERNORM_LINEAR = _TE + "TELayerNormColumnParallelLinear"
TE_COLUMN_PARALLEL_LINEAR = _TE + "TEColumnParallelLinear"
TE_ROW_PARALLEL_LINEAR = _TE + "TERowParallelLinear"
TE_DOT_PRODUCT_ATTENTION = _TE + "TEDotProductAttention"
TE_NORM = _TE + "TENorm"
TE_ACTIVATION = _TE + "TEActivationOp"


def resolve_backend(backend: Backend) -> Literal["te", "local"]:
    """``"auto"`` -> ``"te"`` when TE is usable (TE imports and a GPU is present), else ``"local"``.

    Raises:
        ValueError: ``backend`` is not one of "auto", "te", "local".
    """
    if backend == "auto":
        chosen: Literal["te", "local"] = "te" if is_te_usable() else "local"
        logger.info("layer spec backend 'auto' -> %r", chosen)
        return chosen
    if backend in ("te", "local"):
        return backend
    raise ValueError(f"backend={backend!r}; use 'auto' (TE when usable), 'te' or 'local'")


def _check_dense(num_experts: int | None, moe_grouped_gemm: bool) -> None:
    if num_experts is not None or moe_grouped_gemm:
        raise NotImplementedError(
            f"num_experts={num_experts}, moe_grouped_gemm={moe_grouped_gemm}: mixture-of-experts layers are not "
            "implemented yet; leave num_experts=None"
        )


def _norm_params(normalization: Normalization) -> dict[str, str]:
    return {"normalization": normalization} if normalization is not None else {}


def _te_self_attention(
    mask_type: AttnMaskType, fused_norm: bool, qk_layernorm: bool = False, normalization: Normalization = None
) -> ModuleSpec:
    """Self-attention from TE kernels; ``fused_norm`` puts the layer's input norm into ``linear_qkv``."""
    params = _norm_params(normalization)
    qkv = ModuleSpec(module=TE_LAYERNORM_LINEAR, params=dict(params)) if fused_norm else \
        ModuleSpec(module=TE_COLUMN_PARALLEL_LINEAR)
    qk_norm: ModuleSpec | type = ModuleSpec(module=TE_NORM, params=dict(params)) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=qkv,
            core_attention=ModuleSpec(module=TE_DOT_PRODUCT_ATTENTION),
            linear_proj=ModuleSpec(module=TE_ROW_PARALLEL_LINEAR),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _te_mlp(fused_norm: bool, use_te_activation_func: bool, normalization: Normalization = None) -> ModuleSpec:
    """The MLP from TE kernels; ``fused_norm`` puts the pre-MLP norm into ``linear_fc1``."""
    fc1 = ModuleSpec(module=TE_LAYERNORM_LINEAR, params=_norm_params(normalization)) if fused_norm else \
        ModuleSpec(module=TE_COLUMN_PARALLEL_LINEAR)
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=fc1,
            linear_fc2=ModuleSpec(module=TE_ROW_PARALLEL_LINEAR),
            activation_func=ModuleSpec(module=TE_ACTIVATION) if use_te_activation_func else None,
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
        num_experts: mixture-of-experts layers are not available yet; must be None.
        moe_grouped_gemm: MoE option; must be False.
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
    _check_dense(num_experts, moe_grouped_gemm)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=_te_self_attention(AttnMaskType.causal, True, qk_layernorm, normalization),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=_te_mlp(True, use_te_activation_func, normalization),
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
    from specs.gpt import get_gpt_layer_local_spec  # imported here: specs.gpt re-exports this module

    return get_gpt_layer_local_spec(num_experts, moe_grouped_gemm, qk_layernorm, normalization)


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
    from specs.llama import get_llama_layer_local_spec  # imported here: specs.llama re-exports this module

    return get_llama_layer_local_spec(qk_layernorm)


# ----------------------------------------------------------------------------- BERT and T5
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
            self_attention=_te_self_attention(AttnMaskType.padding, fused_norm=False),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ModuleSpec(module=TE_NORM),
            mlp=_te_mlp(fused_norm=False, use_te_activation_func=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_bert_layer_spec(backend: Backend = "auto") -> ModuleSpec:
    """The BERT layer spec for a backend: ``"te"``, ``"local"``, or ``"auto"`` (TE only when usable)."""
    if resolve_backend(backend) == "te":
        return get_bert_layer_te_spec()
    from specs.bert import get_bert_layer_local_spec

    return get_bert_layer_local_spec()


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
            self_attention=_te_self_attention(AttnMaskType.padding, fused_norm=True),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=_te_mlp(fused_norm=True, use_te_activation_func=False),
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
            self_attention=_te_self_attention(AttnMaskType.causal, fused_norm=True),
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
            mlp=_te_mlp(fused_norm=True, use_te_activation_func=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_t5_layer_specs(backend: Backend = "auto") -> tuple[ModuleSpec, ModuleSpec]:
    """(encoder layer spec, decoder layer spec) for a backend: ``"te"``, ``"local"`` or ``"auto"``."""
    if resolve_backend(backend) == "te":
        require_te("get_t5_layer_specs(backend='te')")
        return get_t5_encoder_layer_te_spec(check_te=False), get_t5_decoder_layer_te_spec(check_te=False)
    from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec

    return get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec()
