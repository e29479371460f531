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
Each family file (``specs.gpt``, ``specs.llama``, ``specs.bert``, ``specs.t5``) holds its local spec,
its TE spec and its backend switch; this module gathers the switches and TE specs of all families in
one place and imports nothing back into them (``specs.common`` holds what they share). TE classes
are named by dotted path, so this module imports on any machine; asking for a TE spec
where TE is not usable raises ``TEUnavailableError`` naming what is missing.

Example, the one-line swap::

    spec = get_gpt_layer_spec(backend="auto")   # TE on a GPU with TE installed, else local
    model = GPTModel(config, spec, vocab_size=50304, max_sequence_length=2048)
"""

from __future__ import annotations

from specs.bert import get_bert_layer_spec, get_bert_layer_te_spec
from specs.common import (
    TE_ACTIVATION,
    TE_COLUMN_PARALLEL_LINEAR,
    TE_DOT_PRODUCT_ATTENTION,
    TE_LAYERNORM_LINEAR,
    TE_NORM,
    TE_ROW_PARALLEL_LINEAR,
    Backend,
    Normalization,
    resolve_backend,
)
from specs.gpt import get_gpt_layer_spec, get_gpt_layer_te_spec
from specs.llama import get_llama_layer_spec, get_llama_layer_te_spec
from specs.t5 import get_t5_decoder_layer_te_spec, get_t5_encoder_layer_te_spec, get_t5_layer_specs

__all__ = [
    "TE_ACTIVATION",
    "TE_COLUMN_PARALLEL_LINEAR",
    "TE_DOT_PRODUCT_ATTENTION",
    "TE_LAYERNORM_LINEAR",
    "TE_NORM",
    "TE_ROW_PARALLEL_LINEAR",
    "Backend",
    "Normalization",
    "get_bert_layer_spec",
    "get_bert_layer_te_spec",
    "get_gpt_layer_spec",
    "get_gpt_layer_te_spec",
    "get_llama_layer_spec",
    "get_llama_layer_te_spec",
    "get_t5_decoder_layer_te_spec",
    "get_t5_encoder_layer_te_spec",
    "get_t5_layer_specs",
    "resolve_backend",
]
