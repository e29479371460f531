"""BertModel: embeddings -> bidirectional TransformerBlock -> pooler + MLM head + binary (NSP) head.

Every layer comes from ``transformer_layer_spec`` (``specs.bert.get_bert_layer_local_spec()``);
the config chooses the norm placement:

* ``layernorm_position="post"`` (original BERT, Hugging Face): each layer is ``norm(x + f(x))``;
  the summed embeddings are normalised too (``embedding.layernorm``) and the encoder has no
  final norm.
* ``layernorm_position="pre"`` (Megatron-Core's BERT): pre-norm layers and a final norm
  (``encoder.final_layernorm``); no embedding norm.

Checkpoint keys are Megatron-Core's: ``embedding.{word,position,tokentype}_embeddings``,
``encoder.layers.N...``, ``pooler.dense``, ``lm_head.dense``, ``lm_head.layer_norm``,
``output_layer.bias`` (and ``output_layer.weight`` when untied), ``binary_head``.
"""

from __future__ import annotations

import torch

from megatron_core.config import TransformerConfig
from megatron_core.models.bert.bert_heads import BertEmbedding, BertLMHead, Pooler, replicated_linear
from megatron_core.models.common.language_module import LanguageModule
from megatron_core.models.common.masks import padding_mask
from megatron_core.models.gpt.gpt_model import check_decoder_spec
from megatron_core.tensor_parallel import ColumnParallelLinear
from megatron_core.transformer.spec_utils import ModuleSpec
from megatron_core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules


def _check_supported(config: TransformerConfig, pre_process: bool, post_process: bool) -> None:
    if config.sequence_parallel:
        raise NotImplementedError(
            "BertModel does not support sequence_parallel yet (the pooler reads the whole sequence); "
            "set sequence_parallel=False"
        )
    if not (pre_process and post_process) or config.pipeline_model_parallel_size != 1:
        raise NotImplementedError(
            f"BertModel is built whole (pre_process=post_process=True, pipeline_model_parallel_size=1); got "
            f"pre_process={pre_process}, post_process={post_process}, "
            f"pipeline_model_parallel_size={config.pipeline_model_parallel_size}"
        )


class BertModel(LanguageModule):
    """A bidirectional encoder with BERT's pre-training heads, built from a layer spec.

    Args:
        config: the TransformerConfig.
        transformer_layer_spec: a layer ``ModuleSpec`` (padding-masked self-attention) or
            ``TransformerBlockSubmodules``.
        vocab_size: vocabulary size (divisible by the TP size).
        max_sequence_length: size of the learned position table.
        num_tokentypes: size of the token-type (segment) table; 0 for none.
        add_binary_head: build the pooler and the binary (next-sentence) head.
        parallel_output: keep MLM logits split over TP (``[b, s, vocab/tp]``); else gather them.
        share_embeddings_and_output_weights: the MLM decoder reuses the word-embedding table.
        pre_process: must be True (no pipeline parallelism for BERT yet).
        post_process: must be True.
        fp16_lm_cross_entropy: compute the MLM loss in fp16 when the logits are fp16.
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec | TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        num_tokentypes: int = 2,
        add_binary_head: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
    ) -> None:
        _check_supported(config, pre_process, post_process)  # first: a refused layout is refused in any world
        super().__init__(config)
        check_decoder_spec(transformer_layer_spec, "encoder.layers")
        self.transformer_layer_spec = transformer_layer_spec
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.num_tokentypes = num_tokentypes
        self.add_binary_head = add_binary_head
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        post_norm = config.layernorm_position == "post"

        self.embedding = BertEmbedding(config, vocab_size, max_sequence_length, num_tokentypes, post_norm)
        # Post-norm layers end in a norm already; pre-norm ones need the final norm.
        self.encoder = TransformerBlock(config, transformer_layer_spec, post_layer_norm=not post_norm)
        self.lm_head = BertLMHead(config.hidden_size, config)
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=True,
            skip_bias_add=False, gather_output=not parallel_output,
            skip_weight_param_allocation=share_embeddings_and_output_weights, tp_comm_buffer_name="lm_head",
        )
        self.pooler: Pooler | None = None
        self.binary_head: torch.nn.Linear | None = None
        if add_binary_head:
            self.pooler = Pooler(config.hidden_size, config)
            self.binary_head = replicated_linear(config, config.hidden_size, 2)
        self.setup_embeddings_and_output_layer()

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        tokentype_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``[b, s]`` -> encoder output ``[s, b, h]`` (before any head).

        Args:
            input_ids: ``[b, s]``.
            attention_mask: ``[b, s]`` with 1 = token, 0 = padding (or a boolean 4-D mask, True = masked).
            tokentype_ids: ``[b, s]`` segment ids; zeros when None (as Hugging Face does).
        """
        b, s = input_ids.shape
        position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        if tokentype_ids is None and self.num_tokentypes > 0:
            tokentype_ids = torch.zeros_like(input_ids)
        hidden = self.embedding(input_ids, position_ids, tokentype_ids)  # [s, b, h]
        return self.encoder(hidden, padding_mask(attention_mask))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        tokentype_ids: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MLM logits (or per-token loss) and binary logits.

        Args:
            input_ids: token ids ``[b, s]``.
            attention_mask: ``[b, s]`` with 1 = token, 0 = padding; None = no padding.
            tokentype_ids: segment ids ``[b, s]`` (zeros when None).
            lm_labels: MLM target ids ``[b, s]``; when given, the first output is the loss.

        Returns:
            ``(lm_logits [b, s, vocab/tp] or lm_loss [b, s], binary_logits [b, 2] or None)``.
        """
        hidden = self.encode(input_ids, attention_mask, tokentype_ids)  # [s, b, h]
        binary_logits = None
        if self.pooler is not None and self.binary_head is not None:
            binary_logits = self.binary_head(self.pooler(hidden))  # [b, 2]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(self.lm_head(hidden), weight=weight)  # [s, b, vocab/tp]
        if lm_labels is None:
            return logits.transpose(0, 1).contiguous(), binary_logits  # [b, s, vocab/tp]
        if not self.parallel_output and self.output_layer.tp_size > 1:
            logits = torch.chunk(logits, self.output_layer.tp_size, dim=-1)[self.output_layer.tp_rank]
        return self.compute_language_model_loss(lm_labels, logits), binary_logits
