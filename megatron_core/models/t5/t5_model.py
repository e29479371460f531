"""T5Model: shared embedding -> encoder stack; decoder stack with cross-attention -> LM head.

Both stacks are ``TransformerBlock``s built from layer specs (``specs.t5``); the decoder's spec
fills the ``cross_attention`` slot. With ``position_embedding_type="relative"`` (T5's own scheme)
each stack has one ``RelativePositionEmbedding`` (bidirectional for the encoder, causal for the
decoder) whose bias ``[1, np/tp, s, s]`` is computed once per forward and added to the scores of
every self-attention layer of that stack; cross-attention has no position bias.

As in T5, the stacks' outputs get dropout after their final norm, and a head tied to the word
embeddings reads the decoder output scaled by ``hidden_size ** -0.5`` (``scale_decoder_outputs``).

Checkpoint keys: ``embedding.word_embeddings``, ``encoder_relative_pos_emb.relative_attention_bias``,
``decoder_relative_pos_emb...``, ``encoder.layers.N...``, ``encoder.final_layernorm``,
``decoder.layers.N.{self_attention,pre_cross_attn_layernorm,cross_attention,...}``,
``decoder.final_layernorm``, ``output_layer.weight`` (untied only).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from megatron_core.config import TransformerConfig
from megatron_core.models.common.embeddings import LanguageModelEmbedding
from megatron_core.models.common.language_module import LanguageModule
from megatron_core.models.common.masks import padding_mask
from megatron_core.models.gpt.gpt_model import check_decoder_spec
from megatron_core.tensor_parallel import ColumnParallelLinear
from megatron_core.transformer.positions import RelativePositionEmbedding
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

T5PositionEmbeddingType = Literal["relative", "learned_absolute"]


def _check_supported(config: TransformerConfig, encoder_config: TransformerConfig) -> None:
    for name, cfg in (("config", config), ("encoder_config", encoder_config)):
        if cfg.sequence_parallel or cfg.pipeline_model_parallel_size != 1:
            raise NotImplementedError(
                f"T5Model: {name} has sequence_parallel={cfg.sequence_parallel}, "
                f"pipeline_model_parallel_size={cfg.pipeline_model_parallel_size}; T5 runs with tensor "
                "parallelism only for now. Fix: sequence_parallel=False, pipeline_model_parallel_size=1"
            )
    if (encoder_config.hidden_size, encoder_config.tensor_model_parallel_size) != (
        config.hidden_size, config.tensor_model_parallel_size
    ):
        raise ValueError(
            f"T5Model: encoder_config (hidden_size={encoder_config.hidden_size}, "
            f"tensor_model_parallel_size={encoder_config.tensor_model_parallel_size}) must match config "
            f"(hidden_size={config.hidden_size}, tensor_model_parallel_size={config.tensor_model_parallel_size})"
        )


class T5Model(LanguageModule):
    """An encoder-decoder language model built from encoder and decoder layer specs.

    Args:
        config: the decoder's TransformerConfig (and the embedding's and head's).
        transformer_encoder_layer_spec: encoder layer spec (or ``TransformerBlockSubmodules``).
        transformer_decoder_layer_spec: decoder layer spec with a cross-attention slot.
        vocab_size: vocabulary size (divisible by the TP size).
        max_sequence_length: longest sequence (size of the position table with learned positions).
        encoder_config: the encoder's config (e.g. another ``num_layers``); defaults to ``config``.
        parallel_output: keep logits split over TP (``[b, s, vocab/tp]``); else gather them.
        share_embeddings_and_output_weights: the LM head reuses the word-embedding table.
        scale_decoder_outputs: multiply the decoder output by ``hidden_size ** -0.5`` before the
            head; None = exactly when the head is tied (T5 v1.0 tied and scaled, v1.1 neither).
        position_embedding_type: ``"relative"`` (T5's bucketed bias) or ``"learned_absolute"``.
        relative_attention_num_buckets: buckets of the relative position bias.
        relative_attention_max_distance: distance where the last bucket starts.
        fp16_lm_cross_entropy: compute the loss in fp16 when the logits are fp16.

    Differences from Megatron-Core's ``T5Model``: ``encoder_config`` is a keyword argument, no
    pipeline split (``add_encoder``/``add_decoder``), and the head is ``output_layer`` with no bias.
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_encoder_layer_spec: ModuleSpec | TransformerBlockSubmodules,
        transformer_decoder_layer_spec: ModuleSpec | TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        encoder_config: TransformerConfig | None = None,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        scale_decoder_outputs: bool | None = None,
        position_embedding_type: T5PositionEmbeddingType = "relative",
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        fp16_lm_cross_entropy: bool = False,
    ) -> None:
        encoder_config = encoder_config if encoder_config is not None else config
        _check_supported(config, encoder_config)  # first: a refused layout is refused in any world
        super().__init__(config)
        if position_embedding_type not in ("relative", "learned_absolute"):
            raise ValueError(f"position_embedding_type={position_embedding_type!r}; use 'relative' or 'learned_absolute'")
        check_decoder_spec(transformer_encoder_layer_spec, "encoder.layers")
        check_decoder_spec(transformer_decoder_layer_spec, "decoder.layers")
        self.encoder_config = encoder_config
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.scale_decoder_outputs = (
            share_embeddings_and_output_weights if scale_decoder_outputs is None else scale_decoder_outputs
        )
        self.position_embedding_type = position_embedding_type
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.pre_process = self.post_process = True

        relative = position_embedding_type == "relative"
        self.embedding = LanguageModelEmbedding(
            config, vocab_size, max_sequence_length, position_embedding_type="none" if relative else "learned_absolute"
        )
        if relative:
            buckets, distance = relative_attention_num_buckets, relative_attention_max_distance
            self.encoder_relative_pos_emb = RelativePositionEmbedding(encoder_config, True, buckets, distance)
            self.decoder_relative_pos_emb = RelativePositionEmbedding(config, False, buckets, distance)
        self.encoder = TransformerBlock(encoder_config, transformer_encoder_layer_spec)
        self.decoder = TransformerBlock(config, transformer_decoder_layer_spec)
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=not parallel_output,
            skip_weight_param_allocation=share_embeddings_and_output_weights, tp_comm_buffer_name="lm_head",
        )
        self.setup_embeddings_and_output_layer()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        positions = None
        if self.position_embedding_type == "learned_absolute":
            positions = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        return self.embedding(input_ids, positions)  # [s, b, h]

    def _stack_dropout(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.dropout(hidden, p=self.config.hidden_dropout, training=self.training)

    def encode(self, encoder_input_ids: torch.Tensor, encoder_attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Encoder token ids ``[b, s_enc]`` (mask ``[b, s_enc]``, 1 = token) -> encoder output ``[s_enc, b, h]``."""
        hidden = self._embed(encoder_input_ids)
        bias = None
        if self.position_embedding_type == "relative":
            s = hidden.shape[0]
            bias = self.encoder_relative_pos_emb(s, s)  # [1, np/tp, s_enc, s_enc]
        hidden = self.encoder(hidden, padding_mask(encoder_attn_mask, "encoder_attn_mask"), attention_bias=bias)
        return self._stack_dropout(hidden)

    def forward(
        self,
        encoder_input_ids: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        encoder_attn_mask: torch.Tensor | None,
        decoder_attn_mask: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder logits ``[b, s_dec, vocab/tp]``, or per-token loss ``[b, s_dec]`` when ``lm_labels`` are given.

        Args:
            encoder_input_ids: ``[b, s_enc]`` (may be None when ``encoder_hidden_states`` is given).
            decoder_input_ids: ``[b, s_dec]`` (T5 starts them with the pad id).
            encoder_attn_mask: ``[b, s_enc]`` with 1 = token, 0 = padding; None = no padding. Masks
                the encoder's self-attention and the decoder's cross-attention.
            decoder_attn_mask: ``[b, s_dec]`` padding flags of the decoder (combined with causality).
            lm_labels: target ids ``[b, s_dec]``.
            encoder_hidden_states: a previous ``encode()`` result ``[s_enc, b, h]`` to reuse.
        """
        if encoder_hidden_states is None:
            if encoder_input_ids is None:
                raise ValueError("T5Model.forward needs encoder_input_ids or encoder_hidden_states")
            encoder_hidden_states = self.encode(encoder_input_ids, encoder_attn_mask)
        hidden = self._embed(decoder_input_ids)  # [s_dec, b, h]
        bias = None
        if self.position_embedding_type == "relative":
            s = hidden.shape[0]
            bias = self.decoder_relative_pos_emb(s, s)  # [1, np/tp, s_dec, s_dec]
        hidden = self.decoder(
            hidden, padding_mask(decoder_attn_mask, "decoder_attn_mask"), context=encoder_hidden_states,
            context_mask=padding_mask(encoder_attn_mask, "encoder_attn_mask"), attention_bias=bias,
        )
        hidden = self._stack_dropout(hidden)
        if self.scale_decoder_outputs:
            hidden = hidden * (self.config.hidden_size ** -0.5)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [s_dec, b, vocab/tp]
        if lm_labels is None:
            return logits.transpose(0, 1).contiguous()  # -> [b, s_dec, vocab/tp]
        if not self.parallel_output and self.output_layer.tp_size > 1:
            logits = torch.chunk(logits, self.output_layer.tp_size, dim=-1)[self.output_layer.tp_rank]
        return self.compute_language_model_loss(lm_labels, logits)
