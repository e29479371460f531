"""``ContextParallelDotProductAttention``: the local attention core, with ring attention under CP.

At context-parallel size 1 it is exactly ``DotProductAttention``. With CP > 1 each rank holds its
two load-balanced chunks of the sequence (``get_batch_on_this_cp_rank``) and attends over the
whole sequence with ``ring_attention`` (causal or unmasked, MHA or GQA, dropout). The local specs
of the families that support CP (GPT, Llama) use it; ``DotProductAttention`` itself refuses CP > 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel.random import get_rng_tracker
from megatron_core.transformer.context_parallel.ring_attention import ring_attention
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_SEED_RANGE = 2**40


class ContextParallelDotProductAttention(DotProductAttention):
    """Scaled dot-product attention whose sequence may be split over the context-parallel group.

    Args: as ``DotProductAttention``, plus
        cp_comm_type: ``"p2p"`` (the ring; the default) or None.
        cp_group: context-parallel group; defaults to parallel_state's.
    """

    supports_context_parallel = True

    def __init__(
        self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
        attention_dropout: float | None = None, softmax_scale: float | None = None, cp_comm_type: str | None = None,
        tp_group: ProcessGroup | None = None, cp_group: ProcessGroup | None = None,
    ) -> None:
        if cp_comm_type not in (None, "p2p"):
            raise ValueError(
                f"cp_comm_type={cp_comm_type!r}: the local context-parallel attention implements the ring "
                "('p2p'); use cp_comm_type='p2p' or None"
            )
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         None, tp_group, cp_group=cp_group)
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
        self.cp_size = parallel_state.group_world_size(self.cp_group)
        if self.cp_size > 1 and attention_type != "self":
            raise ValueError(
                f"ContextParallelDotProductAttention: attention_type={attention_type!r} under context_parallel_size="
                f"{self.cp_size}; only self-attention is split over the sequence. Fix: context_parallel_size=1"
            )

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None, attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[sq, b, ng, hn]`` (this rank's chunks) -> ``[sq, b, np*hn]``."""
        if self.cp_size == 1 or self.cp_group is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "context-parallel attention takes no attention_mask / attention_bias / packed sequences (each rank "
                "holds chunks of the sequence); use the causal mask type and mask padding in the loss"
            )
        sq, b, np_, hn = query.shape
        dropout_p = self.dropout_p if self.training else 0.0
        seed = 0
        if dropout_p > 0.0:
            # One draw per call from the TP stream (heads differ per TP rank); a recompute restores it.
            with get_rng_tracker().fork():
                seed = int(torch.randint(0, _SEED_RANGE, (1,)).item())
        out = ring_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),  # -> [b, heads, sq, hn]
            self.cp_group, causal=mask_type in _CAUSAL, softmax_scale=self.softmax_scale, dropout_p=dropout_p,
            seed=seed,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # -> [sq, b, np*hn]
