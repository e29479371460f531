"""Context parallelism: the sequence split over ranks, attention as a ring (see ``ring_attention``)."""

from megatron_core.transformer.context_parallel.attention import ContextParallelDotProductAttention
from megatron_core.transformer.context_parallel.ring_attention import cp_chunk_ids, ring_attention
from megatron_core.transformer.context_parallel.split import (
    check_sequence_length,
    cp_position_ids,
    get_batch_on_this_cp_rank,
    split_for_cp_rank,
)

__all__ = [
    "ContextParallelDotProductAttention",
    "check_sequence_length",
    "cp_chunk_ids",
    "cp_position_ids",
    "get_batch_on_this_cp_rank",
    "ring_attention",
    "split_for_cp_rank",
]
