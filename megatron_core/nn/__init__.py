"""``megatron_core.nn``: the toolkit as drop-in ``torch.nn`` layers, for plain PyTorch models.

Change one import and a ``torch.nn`` model runs on this toolkit's tensor-parallel layers::

    import megatron_core.nn as nn          # was: import torch.nn as nn

Names defined here replace torch.nn's (``MultiheadAttention``, ``TransformerEncoderLayer``,
``TransformerEncoder``, ``TransformerDecoderLayer``, ``TransformerDecoder``, ``Transformer``);
every other name (``nn.Module``, ``nn.Linear``, ``nn.Dropout``...) *is* torch.nn's, so the rest of
the model is untouched. The parallel building blocks are opt-in by name, TorchShard-style:
``ParallelLinear(..., dim=0|1)``, ``ParallelEmbedding(..., dim=0|1)``, ``ParallelCrossEntropyLoss``,
``ParallelLinear.convert_parallel_linear(model, dim)``, ``RegisterParallelDim`` /
``get_parallel_dim``, ``init.shard_init_helper_`` and ``functional.parallel_*``.

Tensor parallelism is on when ``parallel_state.initialize_model_parallel(tp)`` ran before the model
was built; every rank must then build the model from the same seed and feed it the same inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.nn import functional, init
from megatron_core.nn._base import UnsupportedArgumentError
from megatron_core.nn.attention import MultiheadAttention
from megatron_core.nn.embedding import ParallelEmbedding
from megatron_core.nn.embedding_layer import EmbeddingLayer
from megatron_core.nn.linear import ParallelLinear
from megatron_core.nn.loss import ParallelCrossEntropyLoss
from megatron_core.nn.parallel_dim import RegisterParallelDim, get_parallel_dim, set_parallel_dim
from megatron_core.nn.seq2seq import Transformer
from megatron_core.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "EmbeddingLayer",
    "MultiheadAttention",
    "ParallelCrossEntropyLoss",
    "ParallelEmbedding",
    "ParallelLinear",
    "RegisterParallelDim",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "UnsupportedArgumentError",
    "functional",
    "get_parallel_dim",
    "init",
    "set_parallel_dim",
]


def __getattr__(name: str) -> Any:
    """Every other name is torch.nn's (``nn.Module``, ``nn.Linear``, ``nn.LayerNorm``...)."""
    try:
        return getattr(torch.nn, name)
    except AttributeError:
        raise AttributeError(f"module 'megatron_core.nn' has no attribute {name!r} (nor has torch.nn)") from None
