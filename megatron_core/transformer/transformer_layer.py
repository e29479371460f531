"""One transformer layer: norm -> self-attention -> bda -> [norm -> cross-attention -> bda] -> norm -> MLP -> bda.

Every box is a spec slot; an empty slot (``IdentityOp`` / ``IdentityFuncOp``) passes its input
through, so a decoder-only GPT simply leaves the cross-attention slots empty.

``config.layernorm_position``:

* ``"pre"`` (default, GPT-2 onwards): ``x = x + f(norm(x))``.
* ``"post"`` (original Transformer / BERT): ``x = norm(x + f(x))``. The same slots hold the norms:
  ``input_layernorm`` follows self-attention, ``pre_cross_attn_layernorm`` follows cross-attention
  and ``pre_mlp_layernorm`` follows the MLP, so checkpoint keys stay those of the pre-norm layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel.random import get_rng_tracker
from megatron_core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron_core.transformer.spec_utils import ModuleSpec, build_module

SpecSlot = ModuleSpec | type | Any


@dataclass
class TransformerLayerSubmodules:
    """Specs of a layer's slots; empty slots default to identities."""

    input_layernorm: SpecSlot = IdentityOp
    self_attention: SpecSlot = IdentityOp
    self_attn_bda: SpecSlot = IdentityFuncOp
    pre_cross_attn_layernorm: SpecSlot = IdentityOp
    cross_attention: SpecSlot = IdentityOp
    cross_attn_bda: SpecSlot = IdentityFuncOp
    pre_mlp_layernorm: SpecSlot = IdentityOp
    mlp: SpecSlot = IdentityOp
    mlp_bda: SpecSlot = IdentityFuncOp


class TransformerLayer(MegatronModule):
    """A single transformer layer built from its spec.

    Args:
        config: the TransformerConfig.
        submodules: ``TransformerLayerSubmodules``.
        layer_number: 1-based *global* index of this layer (across pipeline stages).
        hidden_dropout: dropout in the bias-dropout-adds; defaults to ``config.hidden_dropout``.
    """

    def __init__(
        self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1,
        hidden_dropout: float | None = None,
    ) -> None:
        super().__init__(config)
        self.submodules_config = submodules
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout
        self.post_norm = config.layernorm_position == "post"
        norm_kwargs = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.input_layernorm = build_module(submodules.input_layernorm, **norm_kwargs)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.self_attn_bda = build_module(submodules.self_attn_bda)
        self.pre_cross_attn_layernorm = build_module(submodules.pre_cross_attn_layernorm, **norm_kwargs)
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number)
        self.cross_attn_bda = build_module(submodules.cross_attn_bda)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, **norm_kwargs)
        self.mlp = build_module(submodules.mlp, config=config)
        if hasattr(self.mlp, "set_layer_number"):  # MoE layers key their routing statistics by layer
            self.mlp.set_layer_number(layer_number)
        self.mlp_bda = build_module(submodules.mlp_bda)

    def _bda_context(self) -> Any:
        # With sequence parallelism each TP rank holds different tokens: its dropout masks must
        # differ, so they come from the model-parallel RNG stream.
        if self.training and self.hidden_dropout > 0 and self.config.sequence_parallel:
            return get_rng_tracker().fork()
        return contextlib.nullcontext()

    def _residual_block(
        self, hidden_states: torch.Tensor, norm: torch.nn.Module, bda: Any,
        sublayer: Any,
    ) -> torch.Tensor:
        """``x + f(norm(x))`` (pre-norm) or ``norm(x + f(x))`` (post-norm)."""
        if self.post_norm:
            with self._bda_context():
                out = bda(self.training, self.config.bias_dropout_fusion)(
                    sublayer(hidden_states), hidden_states, self.hidden_dropout
                )
            return norm(out)
        normed = norm(hidden_states)
        residual = normed if self.config.apply_residual_connection_post_layernorm else hidden_states
        with self._bda_context():
            return bda(self.training, self.config.bias_dropout_fusion)(sublayer(normed), residual, self.hidden_dropout)

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
        """``[s, b, h]`` -> ``([s, b, h], context)``; ``context`` passes through for the next layer."""
        hidden_states = self._residual_block(
            hidden_states, self.input_layernorm, self.self_attn_bda,
            lambda x: self.self_attention(
                x, attention_mask=attention_mask, inference_params=inference_params,
                rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
            ),
        )
        if not isinstance(self.cross_attention, IdentityOp):
            hidden_states = self._residual_block(
                hidden_states, self.pre_cross_attn_layernorm, self.cross_attn_bda,
                lambda x: self.cross_attention(
                    x, attention_mask=context_mask, key_value_states=context, inference_params=inference_params,
                ),
            )
        hidden_states = self._residual_block(hidden_states, self.pre_mlp_layernorm, self.mlp_bda, self.mlp)
        return hidden_states, context
