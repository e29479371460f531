"""A layer whose attention and MLP both read the layer input: ``x + attn(norm(x)) + mlp(norm'(x))``.

GPT-J (and GPT-NeoX with ``use_parallel_residual``) compute the two sublayers side by side instead
of one after the other. ``TransformerLayer`` chains its sublayers, so no spec of it can express
this; this layer reuses its slots and checkpoint keys and changes only the wiring:

* ``input_layernorm`` normalises ``x`` for attention;
* ``pre_mlp_layernorm`` normalises ``x`` for the MLP; leave it empty (``IdentityOp``) to share the
  attention's norm (GPT-J's single ``ln_1``), fill it for a second norm (GPT-NeoX);
* both outputs go through their bias-dropout-adds into the same residual stream.

Cross-attention slots must stay empty: a parallel layer has no cross-attention.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


class ParallelAttentionMLPLayer(TransformerLayer):
    """Pre-norm layer with attention and MLP in parallel on the same input (GPT-J).

    Args:
        config: the TransformerConfig; ``layernorm_position`` must be ``"pre"``.
        submodules: ``TransformerLayerSubmodules`` (cross-attention slots empty).
        layer_number: 1-based global index of the layer.
        hidden_dropout: dropout in the bias-dropout-adds; defaults to ``config.hidden_dropout``.
    """

    def __init__(
        self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1,
        hidden_dropout: float | None = None,
    ) -> None:
        if config.layernorm_position != "pre" or config.apply_residual_connection_post_layernorm:
            raise ValueError(
                f"ParallelAttentionMLPLayer: layernorm_position={config.layernorm_position!r}, "
                f"apply_residual_connection_post_layernorm={config.apply_residual_connection_post_layernorm}; "
                "the parallel layer is pre-norm with the raw input as residual. Fix: use "
                "layernorm_position='pre' and apply_residual_connection_post_layernorm=False"
            )
        super().__init__(config, submodules, layer_number, hidden_dropout)
        if not isinstance(self.cross_attention, IdentityOp):
            raise ValueError(
                "ParallelAttentionMLPLayer has no cross-attention; leave the cross_attention slot of its spec "
                "empty (IdentityOp) or use TransformerLayer"
            )
        self.shared_norm = isinstance(self.pre_mlp_layernorm, IdentityOp)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rotary_pos_emb: Any = None,
        inference_params: Any = None,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, h]`` -> ``([s, b, h], context)``: ``x + attn(norm(x)) + mlp(norm(x))``."""
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attention_out = self.self_attention(
            normed, attention_mask=attention_mask, inference_params=inference_params,
            rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
        )
        mlp_out = self.mlp(normed if self.shared_norm else self.pre_mlp_layernorm(hidden_states))
        fused = self.config.bias_dropout_fusion
        with self._bda_context():
            hidden_states = self.self_attn_bda(self.training, fused)(attention_out, residual, self.hidden_dropout)
            hidden_states = self.mlp_bda(self.training, fused)(mlp_out, hidden_states, self.hidden_dropout)
        return hidden_states, context
