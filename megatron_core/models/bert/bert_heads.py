"""BERT's pieces around the encoder: the embedding with its norm, the pooler and the MLM head transform.

Names follow Megatron-Core (``pooler.dense``, ``lm_head.dense``, ``lm_head.layer_norm``). These
modules are replicated over TP ranks (small ``h x h`` matrices); the vocabulary projection after
the MLM head is the model's column-parallel ``output_layer``.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_core.config import TransformerConfig
from megatron_core.models.common.embeddings import LanguageModelEmbedding
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel.random import get_rng_tracker
from megatron_core.transformer.norms import build_norm


def replicated_linear(config: TransformerConfig, in_features: int, out_features: int) -> torch.nn.Linear:
    """A ``torch.nn.Linear`` held whole on every TP rank: weight from ``config.init_method``, zero bias."""
    layer = torch.nn.Linear(in_features, out_features, dtype=config.torch_dtype)
    with torch.no_grad():
        # Drawn in fp32 from the default RNG, as the parallel layers do, so every rank agrees.
        weight = torch.empty(out_features, in_features, dtype=torch.float32)
        if config.perform_initialization:
            config.init_method(weight)
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


class BertEmbedding(LanguageModelEmbedding):
    """Word + position + token-type embeddings, then (post-norm BERT) a norm, then dropout.

    Args:
        config: the TransformerConfig.
        vocab_size: vocabulary size.
        max_sequence_length: size of the position table.
        num_tokentypes: size of the token-type (segment) table.
        add_layernorm: normalise the summed embeddings before dropout (original BERT / Hugging Face).
    """

    def __init__(
        self, config: TransformerConfig, vocab_size: int, max_sequence_length: int, num_tokentypes: int, add_layernorm: bool
    ) -> None:
        super().__init__(config, vocab_size, max_sequence_length, "learned_absolute", num_tokentypes)
        self.layernorm: torch.nn.Module | None = None
        if add_layernorm:
            self.layernorm = build_norm(config, config.hidden_size)
            # The parent would drop out before the norm; BERT normalises first, then drops out.
            self.post_norm_dropout = self.embedding_dropout
            self.embedding_dropout = torch.nn.Dropout(0.0)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        tokentype_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``[b, s]`` -> embeddings ``[s, b, h]``."""
        embeddings = super().forward(input_ids, position_ids, tokentype_ids)
        if self.layernorm is None:
            return embeddings
        embeddings = self.layernorm(embeddings)
        use_tp_stream = self.sequence_parallel and self.training and self.post_norm_dropout.p > 0
        with get_rng_tracker().fork() if use_tp_stream else contextlib.nullcontext():
            return self.post_norm_dropout(embeddings)


class Pooler(MegatronModule):
    """``tanh(dense(h[CLS]))``: the sequence summary that the binary (NSP) head reads.

    Args:
        hidden_size: width of the hidden states.
        config: the TransformerConfig.
    """

    def __init__(self, hidden_size: int, config: TransformerConfig) -> None:
        super().__init__(config)
        self.dense = replicated_linear(config, hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, sequence_index: int = 0) -> torch.Tensor:
        """``[s, b, h]`` -> pooled ``[b, h]`` from position ``sequence_index`` (BERT's [CLS])."""
        return torch.tanh(self.dense(hidden_states[sequence_index]))


class BertLMHead(MegatronModule):
    """The MLM transform before the vocabulary projection: ``norm(act(dense(h)))``.

    Args:
        hidden_size: width of the hidden states.
        config: the TransformerConfig (``activation_func``, ``normalization``, ``layernorm_epsilon``).
    """

    def __init__(self, hidden_size: int, config: TransformerConfig) -> None:
        super().__init__(config)
        self.dense = replicated_linear(config, hidden_size, hidden_size)
        self.activation = config.activation
        self.layer_norm = build_norm(config, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h]`` -> ``[s, b, h]``."""
        return self.layer_norm(self.activation(self.dense(hidden_states)))
