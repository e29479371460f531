"""What the layer-spec families share: the backend switch and the Transformer Engine sub-specs.

``resolve_backend`` turns ``"auto"`` into ``"te"`` or ``"local"``; the ``TE_*`` names are the TE
kernels' dotted import paths (so this module imports on any machine, TE or not); ``te_self_attention``
and ``te_mlp`` are the attention and MLP sub-specs every TE layer spec is made of. The family files
(``gpt``, ``llama``, ``bert``, ``t5``) import this module; it imports none of them.
"""

from __future__ import annotations

import logging
from typing import Literal

from megatron_core.extensions.te_usability import is_te_usable
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.spec_utils import ModuleSpec

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


def check_dense(num_experts: int | None, moe_grouped_gemm: bool) -> None:
    if num_experts is not None or moe_grouped_gemm:
        raise NotImplementedError(
            f"num_experts={num_experts}, moe_grouped_gemm={moe_grouped_gemm}: mixture-of-experts layers have no "
            "Transformer Engine spec yet; use specs.gpt.get_gpt_layer_local_spec(num_experts=...) or leave "
            "num_experts=None"
        )


def norm_params(normalization: Normalization) -> dict[str, str]:
    return {"normalization": normalization} if normalization is not None else {}


def te_self_attention(
    mask_type: AttnMaskType, fused_norm: bool, qk_layernorm: bool = False, normalization: Normalization = None
) -> ModuleSpec:
    """Self-attention from TE kernels; ``fused_norm`` puts the layer's input norm into ``linear_qkv``."""
    params = norm_params(normalization)
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


def te_mlp(fused_norm: bool, use_te_activation_func: bool, normalization: Normalization = None) -> ModuleSpec:
    """The MLP from TE kernels; ``fused_norm`` puts the pre-MLP norm into ``linear_fc1``."""
    fc1 = ModuleSpec(module=TE_LAYERNORM_LINEAR, params=norm_params(normalization)) if fused_norm else \
        ModuleSpec(module=TE_COLUMN_PARALLEL_LINEAR)
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=fc1,
            linear_fc2=ModuleSpec(module=TE_ROW_PARALLEL_LINEAR),
            activation_func=ModuleSpec(module=TE_ACTIVATION) if use_te_activation_func else None,
        ),
    )
