"""LanguageModelEmbedding: token (+ learned position, + token type) embeddings -> ``[s, b, h]``.

The word table is a ``VocabParallelEmbedding`` (split over TP along the vocabulary); learned
position and token-type tables are replicated. Models hard-wire this embedding (as Megatron-Core
does) because every backend shares it. With sequence parallelism the output is this rank's slice
of the sequence, ``[s/tp, b, h]``, and its dropout draws from the model-parallel RNG stream.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel import VocabParallelEmbedding, scatter_to_sequence_parallel_region
from megatron_core.tensor_parallel.random import get_rng_tracker
from megatron_core.transformer.positions import LearnedPositionEmbedding, replicated_table

PositionEmbeddingType = Literal["learned_absolute", "rope", "none"]


class LanguageModelEmbedding(MegatronModule):
    """Token embeddings plus optional learned absolute positions and token types.

    Args:
        config: the TransformerConfig.
        vocab_size: number of token ids (divisible by the TP size).
        max_sequence_length: size of the learned position table.
        position_embedding_type: ``learned_absolute`` adds a position table; ``rope``/``none`` do not
            (rotary positions act inside attention).
        num_tokentypes: size of the token-type table (BERT's segments); 0 for none.
        scatter_to_sequence_parallel: return ``[s/tp, b, h]`` when the config is sequence parallel.
        tp_group: tensor-parallel group; defaults to parallel_state's.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: PositionEmbeddingType = "learned_absolute",
        num_tokentypes: int = 0,
        scatter_to_sequence_parallel: bool = True,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, groups={"tp_group": tp_group})
        if position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(
                f"position_embedding_type={position_embedding_type!r}; use 'learned_absolute', 'rope' or 'none'"
            )
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.add_position_embedding = position_embedding_type == "learned_absolute"
        self.num_tokentypes = num_tokentypes
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        self.sequence_parallel = bool(config.sequence_parallel) and scatter_to_sequence_parallel
        # Without tables added after the lookup, the TP reduction can be a reduce-scatter directly.
        self.reduce_scatter_embeddings = (
            self.sequence_parallel and not self.add_position_embedding and num_tokentypes <= 0
        )
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, config.hidden_size, init_method=config.init_method, config=config,
            reduce_scatter_embeddings=self.reduce_scatter_embeddings, tp_group=self.tp_group,
        )
        if self.add_position_embedding:
            self.position_embeddings = LearnedPositionEmbedding(
                max_sequence_length, config.hidden_size, config.init_method, config.torch_dtype,
                config.perform_initialization,
            )
        if num_tokentypes > 0:
            # Drawn in fp32 and cast, like the position table: the same weights in every params_dtype.
            self.tokentype_embeddings = torch.nn.Embedding(num_tokentypes, config.hidden_size, _weight=replicated_table(
                num_tokentypes, config.hidden_size, config.init_method, config.torch_dtype,
                config.perform_initialization,
            ))
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        tokentype_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``[b, s]`` -> embeddings ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism)."""
        embeddings = self.word_embeddings(input_ids)  # [b, s, h] (or [s/tp, b, h] if reduce-scattered)
        if not self.reduce_scatter_embeddings:
            if self.add_position_embedding:
                if position_ids is None:
                    raise ValueError("learned absolute positions need position_ids [b, s]")
                embeddings = embeddings + self.position_embeddings(position_ids)
            embeddings = embeddings.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
            if tokentype_ids is not None:
                if self.num_tokentypes <= 0:
                    raise ValueError("tokentype_ids given but the embedding was built with num_tokentypes=0")
                embeddings = embeddings + self.tokentype_embeddings(tokentype_ids).transpose(0, 1)
            if self.sequence_parallel:
                embeddings = scatter_to_sequence_parallel_region(embeddings, self.tp_group)  # -> [s/tp, b, h]
        # Different tokens per rank under sequence parallelism: draw dropout from the TP stream.
        use_tp_stream = self.sequence_parallel and self.training and self.embedding_dropout.p > 0
        with get_rng_tracker().fork() if use_tp_stream else contextlib.nullcontext():
            return self.embedding_dropout(embeddings)
