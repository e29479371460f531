"""InferenceParams: the key/value cache shared by every attention layer during generation.

Contract with attention (``SelfAttention.forward(..., inference_params=...)``):

* ``key_value_memory_dict[layer_number] = (key_cache, value_cache)``, each
  ``[max_sequence_length, max_batch_size, num_query_groups / tp, head_dim]``, created by the layer on
  its first call;
* a forward pass of ``s`` new tokens writes their keys/values at
  ``[sequence_len_offset : sequence_len_offset + s, batch_size_offset : batch_size_offset + b]`` and
  attends over ``[: sequence_len_offset + s]``; rotary positions start at ``sequence_len_offset``;
* the caller (the generation loop) advances ``sequence_len_offset`` after each forward pass.
"""

from __future__ import annotations

import torch


class InferenceParams:
    """Cache and position of one generation run.

    Args:
        max_batch_size: largest batch the cache holds.
        max_sequence_length: prompt plus generated tokens.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"InferenceParams: max_batch_size={max_batch_size} and max_sequence_length="
                             f"{max_sequence_length} must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.batch_size_offset = 0
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def advance(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` more positions are cached."""
        self.sequence_len_offset += num_tokens
        if self.sequence_len_offset > self.max_sequence_length:
            raise ValueError(f"InferenceParams: {self.sequence_len_offset} positions exceed max_sequence_length="
                             f"{self.max_sequence_length}; allocate a larger cache")

    def reset(self) -> None:
        """Forget the cached positions (the buffers are reused by the next run)."""
        self.sequence_len_offset = 0
        self.batch_size_offset = 0

    def swap_key_value_dict(self, batch_index: torch.Tensor) -> None:
        """Reorder the cached batch entries (beam search keeps the surviving beams)."""
        for layer, (key, value) in self.key_value_memory_dict.items():
            self.key_value_memory_dict[layer] = (key[:, batch_index], value[:, batch_index])
