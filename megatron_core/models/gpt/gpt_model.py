"""GPTModel: embedding -> TransformerBlock (layers from a spec) -> output layer -> logits or loss.

The model holds no layer choice of its own: every module inside the decoder comes from
``transformer_layer_spec``. Only the embedding and the output layer are fixed (as in
Megatron-Core): they are the vocabulary-parallel pieces every backend shares.

Parameter names are Megatron-Core's (``embedding.word_embeddings.weight``,
``decoder.layers.N.self_attention.linear_qkv.weight``, ``decoder.final_layernorm.weight``,
``output_layer.weight``...), so a Megatron-Core local-spec state dict loads with ``strict=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.models.common.embeddings import LanguageModelEmbedding, PositionEmbeddingType
from megatron_core.models.common.language_module import LanguageModule
from megatron_core.tensor_parallel import ColumnParallelLinear
from megatron_core.transformer.context_parallel import cp_position_ids
from megatron_core.transformer.positions import RotaryEmbedding
from megatron_core.transformer.spec_utils import ModuleSpec, check_spec
from megatron_core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules


def check_decoder_spec(spec: Any, path: str = "decoder.layers") -> None:
    """Check the Protocol slots of a layer spec / block spec, naming slots from the model's root."""
    if isinstance(spec, TransformerBlockSubmodules):
        for i, layer_spec in enumerate(spec.layer_specs):
            check_spec(layer_spec, f"{path}.{i}")
    elif isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        check_decoder_spec(spec.submodules, path)
    else:
        check_spec(spec, path)


def _is_default_positions(position_ids: torch.Tensor, seq_len: int) -> bool:
    """Whether ``position_ids`` [b, s] is 0..s-1 on every row (the angles then need no gather)."""
    if position_ids.shape[-1] != seq_len:
        return False
    default = torch.arange(seq_len, device=position_ids.device)
    return bool((position_ids == default).all())


class GPTModel(LanguageModule):
    """A decoder-only language model built from a transformer layer spec.

    Args:
        config: the TransformerConfig.
        transformer_layer_spec: a layer ``ModuleSpec`` (e.g. ``specs.gpt.get_gpt_layer_local_spec()``)
            or ``TransformerBlockSubmodules``.
        vocab_size: vocabulary size (divisible by the TP size).
        max_sequence_length: longest sequence (size of the learned position table).
        pre_process: this pipeline stage holds the embedding.
        post_process: this pipeline stage holds the final norm and output layer.
        fp16_lm_cross_entropy: compute the loss in fp16 when the logits are fp16.
        parallel_output: keep logits split over TP (``[b, s, vocab/tp]``); else gather them.
        share_embeddings_and_output_weights: tie the output layer to the word embeddings.
        position_embedding_type: ``learned_absolute``, ``rope`` or ``none``.
        rotary_percent: fraction of each head's channels that RoPE rotates.
        rotary_base: RoPE's frequency base.
        seq_len_interpolation_factor: linear RoPE position interpolation factor.
        output_layer_bias: give the (untied or tied) output layer a vocab-parallel bias (GPT-J's head).
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec | TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        position_embedding_type: PositionEmbeddingType = "learned_absolute",
        rotary_percent: float = 1.0,
        rotary_base: float = 10000,
        seq_len_interpolation_factor: float | None = None,
        output_layer_bias: bool = False,
    ) -> None:
        super().__init__(config)
        check_decoder_spec(transformer_layer_spec)
        if position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(
                f"position_embedding_type={position_embedding_type!r}; use 'learned_absolute', 'rope' or 'none'"
            )
        self.transformer_layer_spec = transformer_layer_spec
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type
        self.rotary_percent = rotary_percent
        self.output_layer_bias = output_layer_bias
        self.rotary_base = rotary_base
        self.seq_len_interpolation_factor = seq_len_interpolation_factor

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size, max_sequence_length, position_embedding_type=position_embedding_type
            )
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels, rotary_percent, rotary_interleaved=config.rotary_interleaved,
                seq_len_interpolation_factor=seq_len_interpolation_factor, rotary_base=rotary_base,
            )
        self.decoder = TransformerBlock(config, transformer_layer_spec, pre_process=pre_process,
                                        post_process=post_process)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=output_layer_bias,
                skip_bias_add=False, gather_output=not parallel_output,
                # Tied on the same stage: the weight is the embedding table, passed at call time.
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_comm_buffer_name="lm_head",
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Activations from the previous pipeline stage (a list is accepted, as the schedules pass one)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"GPTModel takes one input tensor from the previous stage; got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def _rotary(
        self, decoder_input: torch.Tensor | None, inference_params: Any, position_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.position_embedding_type != "rope":
            return None
        if inference_params is not None:
            # All positions up to the cache size: attention picks those of this step.
            return self.rotary_pos_emb(inference_params.max_sequence_length)  # [max_s, 1, 1, rot_dim]
        hidden = decoder_input if decoder_input is not None else self.decoder.input_tensor
        assert hidden is not None
        seq_len = hidden.shape[0]
        if self.config.sequence_parallel:
            seq_len *= parallel_state.get_tensor_model_parallel_world_size()  # [s/tp] -> s
        cp = parallel_state.get_context_parallel_world_size()
        if cp > 1:
            # This rank holds two chunks of the sequence: rotate by the tokens' true positions.
            if position_ids is None:
                rank = parallel_state.get_context_parallel_rank()
                position_ids = cp_position_ids(seq_len * cp, rank, cp, hidden.device).expand(hidden.shape[1], -1)
            return self.rotary_pos_emb.angles_for_positions(position_ids)  # [s/cp, b, 1, rot_dim]
        if position_ids is None or _is_default_positions(position_ids, seq_len):
            return self.rotary_pos_emb(seq_len)  # [s, 1, 1, rot_dim]
        # Explicit positions (left padding, packed documents): one angle row per token, as HF does.
        return self.rotary_pos_emb.angles_for_positions(position_ids)  # [s, b, 1, rot_dim]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_params: Any = None,
    ) -> torch.Tensor:
        """Token ids ``[b, s]`` -> logits ``[b, s, vocab/tp]``, or loss ``[b, s]`` when ``labels`` are given.

        Args:
            input_ids: token ids ``[b, s]`` (first stage).
            position_ids: ``[b, s]``; used by learned absolute positions and by RoPE (angles per token).
                Under context parallelism ``[b, s/cp]``: the true positions of this rank's chunks
                (``get_batch_on_this_cp_rank`` cuts every ``[b, s]`` input the same way).
            attention_mask: boolean, True = masked out, broadcastable to ``[b, 1, s, s]``; None with a
                causal spec means plain causal attention.
            decoder_input: precomputed embeddings ``[s, b, h]`` instead of ``input_ids``.
            labels: target ids ``[b, s]``; the model then returns the per-token loss.
            inference_params: KV-cache state for generation.

        Returns:
            On the last stage, logits (gathered over TP when ``parallel_output=False``) or the loss;
            on other stages, the hidden states ``[s, b, h]`` for the next stage.
        """
        if inference_params is not None and parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError(
                "GPTModel: KV-cache inference with context_parallel_size > 1 is not supported; generate at CP=1 "
                "(checkpoints load at any CP size)"
            )
        if decoder_input is None and self.pre_process:
            if input_ids is None:
                raise ValueError("GPTModel.forward needs input_ids (or decoder_input) on the first stage")
            decoder_input = self.embedding(input_ids, position_ids)  # [s, b, h] ([s/tp, b, h] with SP)
        hidden_states = self.decoder(
            decoder_input, attention_mask, inference_params=inference_params,
            rotary_pos_emb=self._rotary(decoder_input, inference_params, position_ids),
        )
        if not self.post_process:
            return hidden_states
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is not None and self.fused_loss_applies(hidden_states):
            loss = self.output_layer.cross_entropy(hidden_states, labels.transpose(0, 1), weight)  # [s, b]
            return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]
        logits, _ = self.output_layer(hidden_states, weight=weight)  # [s, b, vocab/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
        if not self.parallel_output and self.output_layer.tp_size > 1:
            # The loss works on vocab-split logits: take this rank's slice of the gathered ones.
            rank = self.output_layer.tp_rank
            logits = torch.chunk(logits, self.output_layer.tp_size, dim=-1)[rank]
        return self.compute_language_model_loss(labels, logits)
