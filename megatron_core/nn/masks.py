"""``torch.nn``-style masks and layouts -> what the toolkit's attention takes.

torch.nn takes an ``attn_mask`` (``[L, S]`` or ``[N * heads, L, S]``) and a ``key_padding_mask``
(``[N, S]``), each either boolean (True = not allowed to attend) or float (added to the scores).
The toolkit's attention core takes a boolean mask (True = masked out) and/or an additive float
bias, both broadcastable to ``[N, heads/tp, L, S]``. All-boolean inputs stay boolean; as soon as one
is float, every mask is folded into one float bias (True -> ``-inf``), as torch does. Per-head masks
are cut to this rank's heads.

Layouts: torch.nn layers are ``[N, L, E]`` (``batch_first``) or ``[L, N, E]``, and also accept an
unbatched ``[L, E]``; the toolkit works on ``[L, N, E]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_core.nn._base import tp_rank, tp_size
from megatron_core.transformer.positions import causal_mask


class AttentionMasks(NamedTuple):
    """What the attention core takes: a boolean mask (True = masked out) and/or an additive bias."""

    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def to_seq_first(x: torch.Tensor, batch_first: bool) -> tuple[torch.Tensor, bool]:
    """torch.nn layout -> ``[L, N, E]``; also returns whether the input was unbatched ``[L, E]``."""
    if x.dim() == 2:
        return x.unsqueeze(1), True  # [L, E] -> [L, 1, E]
    if x.dim() != 3:
        raise ValueError(f"expected a [N, L, E], [L, N, E] or unbatched [L, E] input; got shape {tuple(x.shape)}")
    return (x.transpose(0, 1) if batch_first else x), False  # [N, L, E] -> [L, N, E]


def from_seq_first(x: torch.Tensor, batch_first: bool, unbatched: bool) -> torch.Tensor:
    """``[L, N, E]`` -> the caller's layout (inverse of ``to_seq_first``)."""
    if unbatched:
        return x.squeeze(1)
    return x.transpose(0, 1) if batch_first else x


def _attn_mask_4d(mask: torch.Tensor, batch: int, heads: int, sq: int, sk: int) -> torch.Tensor:
    if mask.dim() == 2:
        if tuple(mask.shape) != (sq, sk):
            raise ValueError(f"attn_mask has shape {tuple(mask.shape)}; a 2-D mask must be ({sq}, {sk}) = (L, S)")
        return mask[None, None]  # [1, 1, L, S]
    if mask.dim() == 3:
        if tuple(mask.shape) != (batch * heads, sq, sk):
            raise ValueError(f"attn_mask has shape {tuple(mask.shape)}; a 3-D mask must be "
                             f"({batch * heads}, {sq}, {sk}) = (N * num_heads, L, S)")
        per_rank = heads // tp_size()
        start = tp_rank() * per_rank
        return mask.view(batch, heads, sq, sk)[:, start:start + per_rank]  # this rank's heads
    raise ValueError(f"attn_mask must be 2-D or 3-D; got shape {tuple(mask.shape)}")


def _padding_mask_4d(mask: torch.Tensor, batch: int, sk: int) -> torch.Tensor:
    if tuple(mask.shape) != (batch, sk):
        raise ValueError(f"key_padding_mask has shape {tuple(mask.shape)}; expected ({batch}, {sk}) = (N, S)")
    return mask[:, None, None, :]  # [N, 1, 1, S]


def build_attention_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool | None, *,
    batch: int, heads: int, sq: int, sk: int, dtype: torch.dtype, device: torch.device, unbatched: bool = False,
) -> AttentionMasks:
    """Combine torch.nn masks into ``AttentionMasks`` for ``[N, heads/tp, L, S]`` scores.

    Args:
        attn_mask: ``[L, S]`` or ``[N * heads, L, S]`` (``[heads, L, S]`` unbatched), bool or float.
        key_padding_mask: ``[N, S]`` (``[S]`` unbatched), bool or float.
        is_causal: with no ``attn_mask``, mask the future (torch requires the mask; we build it).
            With a mask it is only a hint, as in torch: the mask is used as given.
        batch, heads, sq, sk: N, total heads, L, S.
        dtype, device: of the attention scores (for float biases and built masks).
        unbatched: the inputs were ``[L, E]``: masks have no batch dimension.
    """
    if unbatched:
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    if attn_mask is None and is_causal:
        # torch's is_causal is top-left aligned (nn.Transformer.generate_square_subsequent_mask).
        attn_mask = causal_mask(sq, sk, device, alignment="top_left")
    parts = []
    if attn_mask is not None:
        parts.append(_attn_mask_4d(attn_mask, batch, heads, sq, sk))
    if key_padding_mask is not None:
        parts.append(_padding_mask_4d(key_padding_mask, batch, sk))
    if not parts:
        return AttentionMasks()
    if all(p.dtype == torch.bool for p in parts):
        mask = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return AttentionMasks(mask=mask)
    bias = torch.zeros((), dtype=dtype, device=device)
    for part in parts:
        if part.dtype == torch.bool:
            part = torch.zeros(part.shape, dtype=dtype, device=device).masked_fill(part, float("-inf"))
        bias = bias + part.to(dtype)
    return AttentionMasks(bias=bias)
