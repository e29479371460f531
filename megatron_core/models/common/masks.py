"""Attention masks from per-token padding flags, for the encoder models (BERT, T5).

Tokenizers hand out ``attention_mask [b, s]`` with 1 = a real token and 0 = padding. Attention
wants the Megatron convention: boolean, True = masked out, broadcastable to ``[b, heads, sq, sk]``.
"""

from __future__ import annotations

import torch


def padding_mask(attention_mask: torch.Tensor | None, name: str = "attention_mask") -> torch.Tensor | None:
    """``[b, s]`` 1/0 (or True/False) keep flags -> boolean ``[b, 1, 1, s]``, True = padding key.

    Only keys are masked (as Hugging Face does): a padding query still attends to the real tokens,
    so no softmax row is empty and every position has a defined output. A 4-D boolean mask is
    taken as already in the Megatron convention and returned unchanged.

    Raises:
        ValueError: the mask is neither ``[b, s]`` nor a 4-D boolean mask.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.dtype is torch.bool:
        return attention_mask
    if attention_mask.dim() != 2:
        raise ValueError(
            f"{name} has shape {tuple(attention_mask.shape)}; expected [batch, seq] with 1 = token and 0 = padding, "
            "or a boolean [b, 1, sq, sk] mask with True = masked out"
        )
    keep = attention_mask.bool() if attention_mask.dtype is torch.bool else attention_mask > 0.5
    return ~keep[:, None, None, :]  # [b, s] -> [b, 1, 1, s]
