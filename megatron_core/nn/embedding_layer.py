"""``EmbeddingLayer``: word + position + segment embeddings in one module, positions chosen by name.

=========================  ======================================================================
``position_embedding_type``  what it adds
=========================  ======================================================================
``"learned"``              a trained table of ``max_position_embeddings`` vectors, added
                           (``LearnedPositionEmbedding``)
``"fixed"``                fixed sinusoidal vectors (``SinusoidalPositionEmbedding``), added
``"rotary"``               nothing here; ``rotary_angles(seq_len)`` gives the angles that attention
                           applies to queries and keys (``RotaryEmbedding``)
``"relative"``             nothing here; ``compute_position_bias(q_len, k_len)`` gives the
                           ``[1, heads, q, k]`` bias to add to the scores (T5-style)
``None``                   nothing
=========================  ======================================================================

The word table is a ``ParallelEmbedding`` (``dim`` chooses its tensor-parallel split); position
and segment tables are small and replicated.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.module import MegatronModule
from megatron_core.nn.embedding import ParallelEmbedding
from megatron_core.transformer.positions import (
    LearnedPositionEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionEmbedding,
)

__all__ = ["POSITION_EMBEDDING_TYPES", "EmbeddingLayer"]

POSITION_EMBEDDING_TYPES = ("learned", "fixed", "rotary", "relative", None)


class EmbeddingLayer(MegatronModule):
    """Token ids ``[b, s]`` -> embeddings ``[b, s, h]`` (word + absolute position + segment).

    Args:
        vocab_size: number of token ids.
        embedding_size: width ``h``.
        position_embedding_type: one of ``POSITION_EMBEDDING_TYPES`` (see the module docstring).
        max_position_embeddings: table size for ``"learned"`` / ``"fixed"``.
        num_segments: size of the segment (token-type) table; None for none.
        padding_idx: padding id of the word table.
        num_heads: heads, for ``"relative"`` (bias per head) and ``"rotary"`` (default rotary width h/heads).
        rotary_dim: rotated channels per head for ``"rotary"``; rotary_base: its frequency base.
        num_relative_attention_buckets, max_relative_distance, bidirectional_relative_attention: ``"relative"``.
        dim: tensor-parallel split of the word table (None, 0 = vocabulary, 1 = embedding dim).
        device, dtype: of the parameters.
    """

    def __init__(
        self, vocab_size: int, embedding_size: int, position_embedding_type: str | None = "learned",
        max_position_embeddings: int | None = None, num_segments: int | None = None, padding_idx: int | None = None,
        num_heads: int | None = None, rotary_dim: int | None = None, rotary_base: float = 10000.0,
        num_relative_attention_buckets: int = 32, max_relative_distance: int = 128,
        bidirectional_relative_attention: bool = True, dim: int | None = None, device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type={position_embedding_type!r} is not known; use one of "
                             f"{list(POSITION_EMBEDDING_TYPES)}")
        needs_table = position_embedding_type in ("learned", "fixed")
        if needs_table and (max_position_embeddings is None or max_position_embeddings <= 0):
            raise ValueError(f"position_embedding_type={position_embedding_type!r} needs max_position_embeddings > 0; "
                             f"got {max_position_embeddings}")
        if position_embedding_type in ("relative", "rotary") and num_heads is None and rotary_dim is None:
            raise ValueError(f"position_embedding_type={position_embedding_type!r} needs num_heads"
                             + (" (or rotary_dim)" if position_embedding_type == "rotary" else ""))
        self.position_embedding_type = position_embedding_type
        self.word_embeddings = ParallelEmbedding(vocab_size, embedding_size, padding_idx, dim=dim, dtype=dtype)
        self.position_embeddings: torch.nn.Module | None = None
        if position_embedding_type == "learned":
            assert max_position_embeddings is not None
            self.position_embeddings = LearnedPositionEmbedding(
                max_position_embeddings, embedding_size, dtype=dtype or torch.get_default_dtype())
        elif position_embedding_type == "fixed":
            assert max_position_embeddings is not None
            self.position_embeddings = SinusoidalPositionEmbedding(embedding_size, max_position_embeddings)
        self.segment_embeddings = ParallelEmbedding(num_segments, embedding_size, dtype=dtype) if num_segments else None
        self.rotary_embedding: RotaryEmbedding | None = None
        self.relative_position_bias: RelativePositionBias | None = None
        if position_embedding_type == "rotary":
            width = rotary_dim if rotary_dim is not None else embedding_size // (num_heads or 1)
            self.rotary_embedding = RotaryEmbedding(width, rotary_base=rotary_base)
        elif position_embedding_type == "relative":
            assert num_heads is not None
            self.relative_position_bias = RelativePositionBias(
                num_heads, bidirectional_relative_attention, num_relative_attention_buckets, max_relative_distance,
                dtype=dtype or torch.get_default_dtype())
        if device is not None:
            self.to(device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, past_length: int = 0) -> torch.Tensor:
        """``[b, s]`` ids -> ``[b, s, h]``; positions default to ``past_length .. past_length + s - 1``."""
        embeddings = self.word_embeddings(input_ids)  # [b, s, h]
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(past_length, past_length + input_ids.shape[-1], device=input_ids.device)
            embeddings = embeddings + self.position_embeddings(position_ids).to(embeddings.dtype)
        if segment_ids is not None:
            if self.segment_embeddings is None:
                raise ValueError("segment_ids given but the EmbeddingLayer was built without num_segments")
            embeddings = embeddings + self.segment_embeddings(segment_ids)
        return embeddings

    def rotary_angles(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """Rotary angles ``[s, 1, 1, rot_dim]`` (``"rotary"`` only)."""
        if self.rotary_embedding is None:
            raise ValueError(f"rotary_angles needs position_embedding_type='rotary'; this layer has "
                             f"{self.position_embedding_type!r}")
        return self.rotary_embedding(seq_len, offset)

    def compute_position_bias(self, q_len: int, k_len: int, past_length: int = 0) -> torch.Tensor:
        """Relative-position bias ``[1, heads, q_len, k_len]`` (``"relative"`` only)."""
        if self.relative_position_bias is None:
            raise ValueError(f"compute_position_bias needs position_embedding_type='relative'; this layer has "
                             f"{self.position_embedding_type!r}")
        return self.relative_position_bias(q_len, k_len, past_length)
