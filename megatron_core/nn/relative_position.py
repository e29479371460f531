"""T5-style relative position bias: a learned scalar per (distance bucket, head), added to attention scores.

Distances below ``num_buckets / 2`` (per direction when bidirectional) get a bucket each; longer ones
share logarithmically wider buckets up to ``max_distance``, beyond which all fall in the last one.
"""

from __future__ import annotations

import math

import torch

from megatron_core.module import MegatronModule


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket index of each ``key_position - query_position``."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys ahead use the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # only the past is visible
    exact = num_buckets // 2
    # log-spaced buckets from `exact` to `max_distance`
    scaled = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    far = (exact + scaled.long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(MegatronModule):
    """Learned relative-position bias ``[1, heads, q_len, k_len]`` for every head.

    Args:
        num_heads: attention heads (the bias has one value per head and bucket).
        num_buckets: number of distance buckets.
        max_distance: distances beyond this share the last bucket.
        bidirectional: encoder-style (both directions) or decoder-style (past only).
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.relative_attention_bias = torch.nn.Embedding(num_buckets, num_heads)

    def forward(self, q_len: int, k_len: int, past_length: int = 0) -> torch.Tensor:
        """Bias for queries at ``past_length .. past_length + q_len - 1`` over ``k_len`` keys."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(past_length, past_length + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        bucket = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(bucket)  # [q, k, heads]
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, heads, q, k]
