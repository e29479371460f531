"""The local attention core: softmax(q k^T * scale + mask) v through PyTorch's SDPA.

Inputs are Megatron-Core's: queries ``[sq, b, np, hn]``, keys and values ``[sk, b, ng, hn]`` where
``np``/``ng`` are this rank's query heads / query groups (GQA when ``ng < np``: query head ``i``
uses key/value head ``i // (np / ng)``). The output is ``[sq, b, np * hn]``, ready for the
row-parallel output projection.

Masks are boolean with True = masked out, broadcastable to ``[b, np, sq, sk]``. For the causal
mask types the causal mask is bottom-right aligned (``positions.causal_mask``: query ``i`` sees keys
``j <= i + sk - sq``), which is what a KV cache needs; any given mask is combined with it. A row
with every key masked yields zeros (SDPA's safe softmax), not NaN.

Training on CPU in fp32 with the plain causal mask (no autocast; s >= 192, or any s with attention
dropout) runs ``blocked_causal_attention`` instead of SDPA: torch's CPU flash kernel is slower there,
mostly in its backward, and with dropout SDPA leaves the flash kernel for its unfused math path and
draws the mask with ``bernoulli_``, where the blocked kernel draws cheaper 16-bit masks
(``tensor_parallel.cpu_dropout``). It saves the causal probabilities (~``b * np * s^2 / 2`` floats
per layer, plus a byte each for the dropout mask), so it is used only while they stay under
``BLOCKED_MAX_SAVED_BYTES``; above it SDPA runs as before. Evaluation (``training`` False) always
uses SDPA.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel.random import get_rng_tracker
from megatron_core.transformer.blocked_causal_attention import (
    blocked_causal_attention,
    saved_probability_bytes,
)
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.positions import causal_mask

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)
# Without dropout the blocked kernel pays from this sequence length on: whole GPT training steps at 2
# threads took 0.985x (s=192), 0.975x (256) and 0.95x (512) the SDPA steps' time; at s=128 they were
# within +-2% of each other (both signs), and the flash kernel wins outright at s <= 64. With dropout
# SDPA runs its math path, which the blocked kernel beats at every length.
BLOCKED_MIN_SEQ = 192
# Most causal probabilities (bytes, per layer call) the blocked kernel may keep for the backward.
BLOCKED_MAX_SAVED_BYTES = 64 * 2**20


class DotProductAttention(MegatronModule):
    """Scaled dot-product attention over this rank's heads.

    Args:
        config: the TransformerConfig.
        layer_number: 1-based index of the layer (kept for kernels that scale per layer).
        attn_mask_type: default mask kind; ``forward`` may override it.
        attention_type: "self" or "cross" (informational for the local kernel).
        attention_dropout: dropout on the attention probabilities; defaults to the config's.
        softmax_scale: defaults to ``config.softmax_scale`` or ``1/sqrt(kv_channels)``.
        cp_comm_type: context-parallel communication (unsupported by the local kernel; must be None).
        tp_group: tensor-parallel group (defaults to parallel_state's).
        cp_group: context-parallel group (defaults to parallel_state's); checked against
            ``config.context_parallel_size``.
    """

    supports_context_parallel = False  # ContextParallelDotProductAttention splits the sequence

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
        super().__init__(config, groups={"tp_group": tp_group, "cp_group": cp_group})
        if cp_comm_type is not None:
            raise ValueError(
                f"cp_comm_type={cp_comm_type!r}: the local DotProductAttention has no context parallelism; "
                "leave cp_comm_type unset or use ContextParallelDotProductAttention (the GPT/Llama local specs)"
            )
        cp = parallel_state.group_world_size(
            cp_group if cp_group is not None else parallel_state.get_context_parallel_group())
        if cp > 1 and not self.supports_context_parallel:
            raise ValueError(
                f"{type(self).__name__} cannot split the sequence over context_parallel_size={cp}: this family's "
                "spec does not support context parallelism yet. Fix: context_parallel_size=1, or a GPT/Llama local "
                "spec (its core is ContextParallelDotProductAttention)"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if softmax_scale is None:
            softmax_scale = config.softmax_scale
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _use_blocked_causal(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float) -> bool:
        """Whether the fast causal path should run ``blocked_causal_attention`` instead of SDPA (see module doc)."""
        sq, b, np_, _ = query.shape
        return (
            self.training and (sq >= BLOCKED_MIN_SEQ or dropout_p > 0.0)
            and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and saved_probability_bytes(b, np_, sq, dropout=dropout_p > 0.0) <= BLOCKED_MAX_SAVED_BYTES
        )

    def _mask(
        self, mask_type: AttnMaskType, attention_mask: torch.Tensor | None, attention_bias: torch.Tensor | None,
        sq: int, sk: int, device: torch.device, dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """SDPA's ``attn_mask``: boolean True = attend, or additive float when a bias is given."""
        masked_out: torch.Tensor | None = None
        if mask_type in _CAUSAL_TYPES and sq > 1:
            masked_out = causal_mask(sq, sk, device)  # [sq, sk]
        if attention_mask is not None and mask_type is not AttnMaskType.no_mask:
            if attention_mask.dtype is not torch.bool:
                raise TypeError(
                    f"attention_mask has dtype {attention_mask.dtype}; expected a boolean mask with "
                    "True = masked out (convert with `mask < 0.5` or `mask.bool()`)"
                )
            masked_out = attention_mask if masked_out is None else (masked_out | attention_mask)
        if attention_bias is not None:
            bias = attention_bias.to(dtype)
            return bias if masked_out is None else bias.masked_fill(masked_out, float("-inf"))
        return None if masked_out is None else ~masked_out

    def forward(
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
            raise NotImplementedError("packed sequences need a Transformer Engine attention spec")
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        if np_ % ng != 0:
            raise ValueError(f"{np_} query heads cannot share {ng} key/value heads evenly (GQA needs np % ng == 0)")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # Fast path: SDPA's own causal masking is start-aligned, so it is only right when sq == sk.
        use_is_causal = (
            mask_type in _CAUSAL_TYPES and sq == sk and sq > 1 and attention_mask is None and attention_bias is None
        )
        attn_mask = None if use_is_causal else self._mask(
            mask_type, attention_mask, attention_bias, sq, sk, query.device, query.dtype
        )
        q = query.permute(1, 2, 0, 3)  # [sq, b, np, hn] -> [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [sk, b, ng, hn] -> [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads differ per TP rank, so their dropout masks come from the model-parallel RNG stream.
        rng = get_rng_tracker().fork() if dropout_p > 0.0 else contextlib.nullcontext()
        with rng:
            if use_is_causal and self._use_blocked_causal(query, key, value, dropout_p):
                out = blocked_causal_attention(q, k, v, self.softmax_scale, dropout_p=dropout_p)  # [b, np, sq, hn]
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=use_is_causal,
                    scale=self.softmax_scale, enable_gqa=ng != np_,
                )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # -> [sq, b, np*hn]
