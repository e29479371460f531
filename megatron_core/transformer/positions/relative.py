"""T5's bucketed relative position bias: one learned scalar per (distance bucket, head), added to the scores.

The bias depends only on ``key_position - query_position``. Small distances get a bucket each;
larger ones share logarithmically wider buckets up to ``max_distance``, beyond which all distances
fall into the last bucket. A bidirectional bias (the encoder) spends half of the buckets on keys
after the query; a causal one (the decoder) only sees keys at or before the query.

``relative_position_bucket`` is the one bucket function. ``RelativePositionBias`` holds the table
(all heads: the ``torch.nn``-style facade); ``RelativePositionEmbedding`` builds it from a config
with the heads split over TP (the models). One ``RelativePositionEmbedding`` serves a whole stack: the model computes the bias once per forward
and hands it to every layer as ``attention_bias`` ``[1, np/tp, sq, sk]``, which the attention core
adds to the (unscaled, in T5) scores. Hugging Face T5 keeps the table in the first layer of each
stack only; the values are the same.

Tensor parallelism: each rank attends with its own heads, so the table ``[num_buckets, heads]`` is
split over TP along the heads (axis 1); the gradient of a rank's columns is then complete on that
rank, and checkpoints store the one global table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict
from megatron_core.module import MegatronModule, make_sharded_tensors_for_checkpoint
from megatron_core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron_core.transformer.positions.learned import InitMethod, replicated_table


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Bucket index of each ``key - query`` distance, as T5 (mesh-tensorflow) defines it.

    Args:
        relative_position: integer distances ``key_pos - query_pos``, any shape.
        bidirectional: keys after the query get their own half of the buckets (encoder); else
            positive distances (the future) share bucket 0 with distance 0 (decoder).
        num_buckets: number of buckets (the table's rows).
        max_distance: distances at or beyond this share the last bucket.

    Returns:
        Long tensor of the same shape with values in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Same float32 operations, in the same order, as the reference, so boundary distances land in
    # the same bucket; clamping at 1 only avoids log(0) in entries that is_small selects anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.clamp(if_large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, if_large)


def _check_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    if num_buckets < 4 or max_distance <= num_buckets // (4 if bidirectional else 2):
        raise ValueError(
            f"relative position bias: num_buckets={num_buckets}, max_distance={max_distance} leave no "
            "logarithmic buckets; use num_buckets >= 4 and max_distance larger than the exact range "
            "(T5: 32 and 128)"
        )


class RelativePositionBias(MegatronModule):
    """A bucketed relative-position bias table ``[num_buckets, heads]`` (all heads, or a slice of them).

    Args:
        num_heads: attention heads of the whole model.
        bidirectional: True for an encoder, False for a causal decoder.
        num_buckets: T5's ``relative_attention_num_buckets``.
        max_distance: T5's ``relative_attention_max_distance``.
        init_method: in-place initialiser of the full fp32 table (``torch.nn.Embedding``'s N(0, 1)
            by default).
        dtype: of the table.
        perform_initialization: draw the table (else zeros, to be loaded).
        heads: the ``(start, end)`` heads this module keeps (default all). The full table is drawn
            and sliced, so the values do not depend on the split.
    """

    def __init__(
        self, num_heads: int, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128, *,
        init_method: InitMethod = torch.nn.init.normal_, dtype: torch.dtype = torch.float32,
        perform_initialization: bool = True, heads: tuple[int, int] | None = None,
        config: TransformerConfig | None = None,
    ) -> None:
        super().__init__(config)
        _check_buckets(num_buckets, max_distance, bidirectional)
        self.num_heads, self.bidirectional = num_heads, bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        start, end = heads if heads is not None else (0, num_heads)
        self.heads_per_partition = end - start
        full = replicated_table(num_buckets, num_heads, init_method, torch.float32, perform_initialization)
        self.relative_attention_bias = torch.nn.Embedding(
            num_buckets, self.heads_per_partition, _weight=full[:, start:end].to(dtype).contiguous()
        )

    def forward(self, query_length: int, key_length: int, offset: int = 0) -> torch.Tensor:
        """Bias ``[1, heads, sq, sk]`` for queries at ``offset .. offset + sq - 1`` over keys ``0 .. sk - 1``."""
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + offset
        key_pos = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(
            key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance
        )  # [sq, sk]
        values = self.relative_attention_bias(buckets)  # [sq, sk, heads]
        return values.permute(2, 0, 1).unsqueeze(0)  # -> [1, heads, sq, sk]

    def extra_repr(self) -> str:
        return (f"bidirectional={self.bidirectional}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, heads={self.heads_per_partition}/{self.num_heads}")


class RelativePositionEmbedding(RelativePositionBias):
    """A stack's relative position bias, its heads split over TP (Megatron-Core's name; T5's
    ``relative_attention_bias``).

    Args:
        config: the TransformerConfig (heads, init, dtype).
        bidirectional: True for an encoder, False for a causal decoder.
        num_buckets: T5's ``relative_attention_num_buckets``.
        max_distance: T5's ``relative_attention_max_distance``.
        tp_group: tensor-parallel group; defaults to parallel_state's.
    """

    def __init__(
        self, config: TransformerConfig, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        # Checked against the group really used (explicit or parallel_state's) before dividing by its size.
        parallel_state.check_config_parallel_sizes(config, {"tp_group": tp_group})
        group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        tp, rank = parallel_state.group_world_size(group), parallel_state.group_rank(group)
        per_rank = config.num_attention_heads // tp
        super().__init__(
            config.num_attention_heads, bidirectional, num_buckets, max_distance, init_method=config.init_method,
            dtype=config.torch_dtype, perform_initialization=config.perform_initialization,
            heads=(rank * per_rank, (rank + 1) * per_rank),
        )
        self.config = config
        self.tp_group = group
        set_tensor_model_parallel_attributes(self.relative_attention_bias.weight, True, 1, 1)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        """The table split along axis 1 (heads)."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"relative_attention_bias.weight": 1}, sharded_offsets
        )
