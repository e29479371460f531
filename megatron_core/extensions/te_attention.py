"""``TEDotProductAttention``: Transformer Engine's attention core behind the local core's call and masks.

Same constructor and ``forward`` as ``megatron_core.transformer.dot_product_attention.DotProductAttention``;
same mask semantics (boolean, True = masked out; the causal mask is aligned to the *end* of the
keys, as a KV cache needs, and any given mask is combined with it; ``no_mask`` ignores a given
mask). How each case reaches TE:

==========================================  =========================================================
call                                        TE ``attn_mask_type`` (+ extra inputs)
==========================================  =========================================================
causal, no mask, ``sq == sk``               ``causal`` (flash / fused kernels)
causal, no mask, ``sq < sk`` (KV cache)     ``causal_bottom_right``
causal with ``sq == 1``, no_mask, padding   ``no_mask``
  without a mask
a boolean mask given                        ``arbitrary`` with the combined mask ``[b|1, np|1, sq, sk]``
an additive ``attention_bias`` given        ``no_mask`` + ``post_scale_bias`` (mask folded in as -inf)
==========================================  =========================================================

Importing this module raises ``TEUnavailableError`` unless TE is usable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_common import TEModuleMixin, resolve_tp, te
from megatron_core.tensor_parallel.random import get_rng_tracker
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.positions import causal_mask

__all__ = ["TEDotProductAttention"]

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


class TEDotProductAttention(TEModuleMixin, te.pytorch.DotProductAttention):
    """TE's fused attention core (flash / cuDNN fused / unfused, chosen by TE) over this rank's heads.

    Args:
        config: the TransformerConfig (heads, query groups, kv_channels, dropout, softmax scale).
        layer_number: 1-based index of the layer.
        attn_mask_type: default mask kind; ``forward`` may override it.
        attention_type: "self" or "cross".
        attention_dropout: dropout on the attention probabilities; defaults to the config's.
        softmax_scale: defaults to ``config.softmax_scale`` or ``1/sqrt(kv_channels)``.
        cp_comm_type: TE's context-parallel communication under CP > 1 (default ``"p2p"``: the ring);
            must be None at CP = 1.
        tp_group: tensor-parallel group; defaults to parallel_state's.
        cp_group: context-parallel group; defaults to parallel_state's. Under CP > 1 TE's attention
            gets it with its global ranks (and a CUDA stream): the inputs are this rank's two
            load-balanced chunks (``get_batch_on_this_cp_rank``), as TE expects. Checked only against a
            CPU stand-in of TE's API here (no GPU/TE): unverified on Transformer Engine itself.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        tp_group: ProcessGroup | None = None,
        *,
        cp_group: ProcessGroup | None = None,
    ) -> None:
        parallel_state.check_config_parallel_sizes(config, {"tp_group": tp_group, "cp_group": cp_group})
        cp_kwargs = _context_parallel_kwargs(cp_group, cp_comm_type)
        group, tp_size, _ = resolve_tp(tp_group)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        scale = softmax_scale if softmax_scale is not None else config.softmax_scale
        scale = scale if scale is not None else 1.0 / math.sqrt(config.kv_channels)
        super().__init__(
            num_attention_heads=config.num_attention_heads,
            kv_channels=config.kv_channels,
            num_gqa_groups=config.num_query_groups,
            attention_dropout=dropout,
            qkv_format="sbhd",
            attn_mask_type=_te_mask_name(attn_mask_type),
            sequence_parallel=bool(config.sequence_parallel) and tp_size > 1,
            tp_size=tp_size,
            # Heads differ per TP rank, so dropout draws from the model-parallel stream, as locally.
            get_rng_state_tracker=get_rng_tracker if dropout > 0.0 else None,
            tp_group=group if tp_size > 1 else None,
            layer_number=max(1, layer_number),
            attention_type=attention_type,
            softmax_scale=scale,
            **cp_kwargs,
        )
        self.context_parallel = bool(cp_kwargs)
        self.config = config
        self.default_mask_type = attn_mask_type

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """Attend ``query`` ``[sq, b, np, hn]`` over ``key``/``value`` ``[sk, b, ng, hn]`` -> ``[sq, b, np*hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences (packed_seq_params) are not wired to TE's THD format yet; pad the batch instead"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.default_mask_type
        if self.context_parallel and (attention_mask is not None or attention_bias is not None):
            raise ValueError(
                "TEDotProductAttention under context parallelism takes no attention_mask / attention_bias (TE's "
                "ring handles causal and no-mask attention only); mask padding in the loss instead"
            )
        te_type, mask, bias = _te_mask_inputs(mask_type, attention_mask, attention_bias, query, key)
        kwargs: dict[str, Any] = {"attn_mask_type": te_type, "qkv_format": "sbhd"}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if bias is not None:
            kwargs["core_attention_bias_type"] = "post_scale_bias"
            kwargs["core_attention_bias"] = bias
        out = super().forward(query, key, value, **kwargs)  # [sq, b, np*hn]
        return out


def _context_parallel_kwargs(cp_group: ProcessGroup | None, cp_comm_type: str | None) -> dict[str, Any]:
    """TE's context-parallel arguments (none at CP = 1), Megatron-Core's wiring: group, global ranks, stream."""
    group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
    if parallel_state.group_world_size(group) == 1:
        if cp_comm_type is not None:
            raise ValueError(f"cp_comm_type={cp_comm_type!r} without context parallelism (context_parallel_size=1); "
                             "leave cp_comm_type unset")
        return {}
    ranks = (torch.distributed.get_process_group_ranks(group) if cp_group is not None
             else parallel_state.get_context_parallel_global_ranks())
    stream = torch.cuda.Stream() if torch.cuda.is_available() else None
    return {"cp_group": group, "cp_global_ranks": list(ranks), "cp_stream": stream,
            "cp_comm_type": cp_comm_type or "p2p"}


def _te_mask_name(mask_type: AttnMaskType) -> str:
    """TE's name for the constructor default (forward passes the exact type every call)."""
    return "causal" if mask_type in _CAUSAL_TYPES else "no_mask"


def _te_mask_inputs(
    mask_type: AttnMaskType, attention_mask: torch.Tensor | None, attention_bias: torch.Tensor | None,
    query: torch.Tensor, key: torch.Tensor,
) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """(TE mask type, boolean mask ``[b|1, np|1, sq, sk]`` or None, additive bias ``[b|1, np, sq, sk]`` or None)."""
    sq, sk, np_ = query.shape[0], key.shape[0], query.shape[2]
    causal = mask_type in _CAUSAL_TYPES and sq > 1
    given = attention_mask if mask_type is not AttnMaskType.no_mask else None
    if given is not None and given.dtype is not torch.bool:
        raise TypeError(
            f"attention_mask has dtype {given.dtype}; expected a boolean mask with True = masked out "
            "(convert with `mask < 0.5` or `mask.bool()`)"
        )
    if given is None and attention_bias is None:
        if not causal:
            return "no_mask", None, None
        return ("causal" if sq == sk else "causal_bottom_right"), None, None
    masked_out = causal_mask(sq, sk, query.device) if causal else None  # [sq, sk], end-aligned
    if given is not None:
        masked_out = given if masked_out is None else (masked_out | given)
    if attention_bias is not None:
        bias = attention_bias.to(query.dtype)
        if masked_out is not None:
            bias = bias.masked_fill(masked_out, float("-inf"))
        full = torch.broadcast_shapes(bias.shape, (1, np_, sq, sk))
        return "no_mask", None, bias.expand(full).contiguous()  # [b|1, np, sq, sk]
    assert masked_out is not None
    full = torch.broadcast_shapes(masked_out.shape, (1, 1, sq, sk))
    return "arbitrary", masked_out.expand(full).contiguous(), None  # [b|1, np|1, sq, sk]
