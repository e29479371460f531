"""Self- and cross-attention: projections, optional q/k norms, rotary, KV cache, core, output projection.

Fused QKV layout (Megatron-Core's): the rows of ``linear_qkv.weight`` are grouped per query group;
each group holds its ``np/ng`` query heads, then its key head, then its value head::

    [ q(g0,h0) .. q(g0,h{np/ng-1}) k(g0) v(g0) | q(g1,..) k(g1) v(g1) | ... ]   (each block hn rows)

so a column-parallel split over TP ranks hands each rank whole groups, and no gather is needed to
separate q, k and v.

KV cache (inference): ``inference_params`` carries ``key_value_memory_dict`` (layer_number ->
(key_cache, value_cache), each ``[max_sequence_length, max_batch_size, ng/tp, hn]``),
``sequence_len_offset`` and ``batch_size_offset``. A step writes its post-rotary keys/values at
``[offset : offset + s]`` and attends over ``[: offset + s]``; its rotary positions start at offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel import random as tp_random
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.positions import apply_rotary_pos_emb
from megatron_core.transformer.spec_utils import ModuleSpec, build_module

RotaryArg = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


class LinearQkvBuilder(Protocol):
    """Constructor call for the ``linear_qkv`` / ``linear_q`` / ``linear_kv`` slots (column-parallel)."""

    def __call__(
        self, input_size: int, output_size: int, /, *, config: TransformerConfig,
        init_method: Callable[[torch.Tensor], torch.Tensor], gather_output: bool, bias: bool,
        skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: str | None, tp_group: ProcessGroup | None,
    ) -> torch.nn.Module: ...


class LinearProjBuilder(Protocol):
    """Constructor call for the ``linear_proj`` slot (row-parallel)."""

    def __call__(
        self, input_size: int, output_size: int, /, *, config: TransformerConfig,
        init_method: Callable[[torch.Tensor], torch.Tensor], bias: bool, input_is_parallel: bool,
        skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: str | None, tp_group: ProcessGroup | None,
    ) -> torch.nn.Module: ...


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type | LinearQkvBuilder
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type | LinearProjBuilder
    q_layernorm: ModuleSpec | type | None = None
    k_layernorm: ModuleSpec | type | None = None


@dataclass
class CrossAttentionSubmodules:
    linear_q: ModuleSpec | type | LinearQkvBuilder
    linear_kv: ModuleSpec | type | LinearQkvBuilder
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type | LinearProjBuilder


class Attention(MegatronModule):
    """Shared parts of self- and cross-attention: sizes, core, output projection, rotary, KV cache."""

    def __init__(
        self, config: TransformerConfig, submodules: Any, layer_number: int, attn_mask_type: AttnMaskType,
        attention_type: str, cp_comm_type: str | None = None, tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, groups={"tp_group": tp_group})
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.group_world_size(self.tp_group)
        self.hidden_size_per_attention_head = config.kv_channels
        self.query_projection_size = config.kv_channels * config.num_attention_heads
        self.kv_projection_size = config.kv_channels * config.num_query_groups
        self.num_attention_heads_per_partition = config.num_attention_heads // tp
        self.num_query_groups_per_partition = config.num_query_groups // tp
        # Selective recompute (Megatron-Core's default module set): the core attention only.
        self.checkpoint_core_attention = config.recompute_granularity == "selective"
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type=attention_type, cp_comm_type=cp_comm_type, tp_group=self.tp_group,
        )
        # cast: slot annotations name builder Protocols for check_spec; build_module takes any spec.
        self.linear_proj = build_module(
            submodules.linear_proj, self.query_projection_size, config.hidden_size,
            config=config, init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

    # ------------------------------------------------------------------ rotary and KV cache
    def _rotate(
        self, query: torch.Tensor, key: torch.Tensor, rotary_pos_emb: RotaryArg, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if rotary_pos_emb is None:
            return query, key
        q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        sq, sk = query.shape[0], key.shape[0]
        # Angles may cover more positions than this step (a KV-cache run passes all of them).
        q_freqs, k_freqs = q_freqs[offset:offset + sq], k_freqs[offset:offset + sk]
        interleaved = self.config.rotary_interleaved
        return (apply_rotary_pos_emb(query, q_freqs, interleaved),
                apply_rotary_pos_emb(key, k_freqs, interleaved))

    def _update_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, inference_params: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's ``key``/``value`` ``[s, b, ng, hn]`` into the cache; return the history."""
        caches = inference_params.key_value_memory_dict
        if self.layer_number not in caches:
            shape = (inference_params.max_sequence_length, inference_params.max_batch_size,
                     key.shape[2], key.shape[3])
            caches[self.layer_number] = (
                torch.empty(shape, dtype=key.dtype, device=key.device),
                torch.empty(shape, dtype=value.dtype, device=value.device),
            )
        key_cache, value_cache = caches[self.layer_number]
        start = inference_params.sequence_len_offset
        end = start + key.shape[0]
        b0 = inference_params.batch_size_offset
        b1 = b0 + key.shape[1]
        if end > key_cache.shape[0] or b1 > key_cache.shape[1]:
            raise ValueError(
                f"layer {self.layer_number}: KV cache of {key_cache.shape[0]} positions x {key_cache.shape[1]} "
                f"sequences cannot hold positions [{start}, {end}) of batch rows [{b0}, {b1}); "
                "raise max_sequence_length / max_batch_size of the inference params"
            )
        key_cache[start:end, b0:b1] = key
        value_cache[start:end, b0:b1] = value
        return key_cache[:end, b0:b1], value_cache[:end, b0:b1]

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
        inference_params: Any, rotary_pos_emb: RotaryArg, attention_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary, cache, core attention and output projection: q ``[sq, b, np, hn]`` -> ``[sq, b, h]``."""
        offset = inference_params.sequence_len_offset if inference_params is not None else 0
        query, key = self._rotate(query, key, rotary_pos_emb, offset)
        if inference_params is not None:
            key, value = self._update_kv_cache(key, value, inference_params)
        if self.checkpoint_core_attention and self.training and torch.is_grad_enabled():
            context = self._checkpointed_core_attention(query, key, value, attention_mask, attention_bias)
        else:
            context = self.core_attention(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type, attention_bias=attention_bias
            )  # [sq, b, np*hn]
        return self.linear_proj(context)

    def _checkpointed_core_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
        attention_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Selective recompute: keep only q, k, v (and the mask) for backward; the ``[b, np, sq, sk]``
        scores, probabilities and dropout mask are rebuilt in backward with the same RNG states."""

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
            return self.core_attention(q, k, v, mask, attn_mask_type=self.attn_mask_type, attention_bias=bias)

        return tp_random.checkpoint(core, False, query, key, value, attention_mask, attention_bias)


class SelfAttention(Attention):
    """Self-attention with a fused, per-query-group QKV projection.

    Args:
        config: the TransformerConfig.
        submodules: ``SelfAttentionSubmodules``.
        layer_number: 1-based global index of the layer (also the KV-cache key).
        attn_mask_type: mask kind handed to the core.
        cp_comm_type: context-parallel communication type (None for the local core).
        tp_group: tensor-parallel group; defaults to parallel_state's.
    """

    def __init__(
        self, config: TransformerConfig, submodules: SelfAttentionSubmodules, layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding, cp_comm_type: str | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, submodules, layer_number, attn_mask_type, "self", cp_comm_type, tp_group)
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, self.query_projection_size + 2 * self.kv_projection_size,
            config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=self.tp_group,
        )
        hn = self.hidden_size_per_attention_head
        norm_q = submodules.q_layernorm if submodules.q_layernorm is not None else IdentityOp
        norm_k = submodules.k_layernorm if submodules.k_layernorm is not None else IdentityOp
        self.q_layernorm = build_module(norm_q, config=config, hidden_size=hn, eps=config.layernorm_epsilon)
        self.k_layernorm = build_module(norm_k, config=config, hidden_size=hn, eps=config.layernorm_epsilon)
        # Each TP rank normalises only its own heads: these replicated weights get partial grads.
        for param in [*self.q_layernorm.parameters(), *self.k_layernorm.parameters()]:
            param.tp_partial_grad = True  # type: ignore[attr-defined]

    def get_query_key_value_tensors(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[s, b, h]`` -> q ``[s, b, np, hn]``, k and v ``[s, b, ng, hn]`` (this rank's heads)."""
        mixed, _ = self.linear_qkv(hidden_states)  # [s, b, ng/tp * (np/ng + 2) * hn]
        s, b = mixed.shape[0], mixed.shape[1]
        ng = self.num_query_groups_per_partition
        heads_per_group = self.num_attention_heads_per_partition // ng
        hn = self.hidden_size_per_attention_head
        mixed = mixed.view(s, b, ng, (heads_per_group + 2) * hn)  # one slot per query group
        query, key, value = torch.split(mixed, [heads_per_group * hn, hn, hn], dim=3)
        query = query.reshape(s, b, ng * heads_per_group, hn)  # [s, b, np, hn]
        query = self.q_layernorm(query)
        key = self.k_layernorm(key)  # [s, b, ng, hn]
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        inference_params: Any = None,
        rotary_pos_emb: RotaryArg = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, h]`` -> ``(output [s, b, h], bias)``; the bias is left for bias-dropout-add."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need a Transformer Engine attention spec")
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        return self._attend(query, key, value, attention_mask, inference_params, rotary_pos_emb, attention_bias)


class CrossAttention(Attention):
    """Attention from ``hidden_states`` (queries) to ``key_value_states`` (keys/values, e.g. an encoder's output).

    Args:
        config: the TransformerConfig.
        submodules: ``CrossAttentionSubmodules``.
        layer_number: 1-based global index of the layer.
        attn_mask_type: mask kind handed to the core (padding by default).
        cp_comm_type: context-parallel communication type (None for the local core).
        tp_group: tensor-parallel group; defaults to parallel_state's.
    """

    def __init__(
        self, config: TransformerConfig, submodules: CrossAttentionSubmodules, layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding, cp_comm_type: str | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, submodules, layer_number, attn_mask_type, "cross", cp_comm_type, tp_group)
        if config.num_query_groups != config.num_attention_heads:
            raise ValueError(
                f"CrossAttention needs num_query_groups == num_attention_heads ({config.num_attention_heads}); "
                f"got num_query_groups={config.num_query_groups}. Fix: use multi-head attention for "
                "cross-attention configs"
            )
        bias = config.add_bias_linear
        common = dict(config=config, init_method=config.init_method, gather_output=False, bias=bias,
                      skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, self.query_projection_size,
                                     tp_comm_buffer_name="q", **common)
        self.linear_kv = build_module(submodules.linear_kv, config.hidden_size, 2 * self.kv_projection_size,
                                      tp_comm_buffer_name="kv", **common)

    def get_query_key_value_tensors(
        self, hidden_states: torch.Tensor, key_value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[sq, b, np, hn]`` from ``hidden_states``; k, v ``[sk, b, np, hn]`` from ``key_value_states``."""
        hn = self.hidden_size_per_attention_head
        np_ = self.num_attention_heads_per_partition
        mixed_kv, _ = self.linear_kv(key_value_states)  # [sk, b, np * 2 * hn], per head: k then v
        sk, b = mixed_kv.shape[0], mixed_kv.shape[1]
        key, value = torch.split(mixed_kv.view(sk, b, np_, 2 * hn), [hn, hn], dim=3)
        query, _ = self.linear_q(hidden_states)  # [sq, b, np * hn]
        query = query.view(query.shape[0], query.shape[1], np_, hn)
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        inference_params: Any = None,
        rotary_pos_emb: RotaryArg = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries ``[sq, b, h]``, context ``[sk, b, h]`` -> ``(output [sq, b, h], bias)``."""
        if key_value_states is None:
            raise ValueError("CrossAttention.forward needs key_value_states (the context to attend to)")
        if inference_params is not None:
            raise NotImplementedError(
                "CrossAttention has no KV cache yet: recompute the context keys per step (pass inference_params=None)"
            )
        query, key, value = self.get_query_key_value_tensors(hidden_states, key_value_states)
        return self._attend(query, key, value, attention_mask, None, rotary_pos_emb, attention_bias)
