"""LanguageModule: what every language model shares (loss, tied embeddings, checkpoint of the tie).

Tied input/output embeddings: on a single pipeline stage the output layer has no weight of its own
and reads the word-embedding table. With pipelining the last stage holds a copy
(``output_layer.weight``): it starts as zeros and is summed with the first stage's table over the
embedding group, so both hold the same values; both are tagged ``shared_embedding`` so that a
training loop sums their gradients over that group. In a checkpoint the copy is stored under the
embedding's key as a non-main replica (written once, loaded by both).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict, ShardedTensor
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel import vocab_parallel_cross_entropy


class LanguageModule(MegatronModule):
    """Base of GPT/BERT/T5: loss from vocab-parallel logits and tied-embedding plumbing.

    Subclasses set ``pre_process``, ``post_process``, ``share_embeddings_and_output_weights`` and,
    where present, ``embedding`` (with ``word_embeddings``) and ``output_layer``.
    """

    pre_process: bool
    post_process: bool
    share_embeddings_and_output_weights: bool
    embedding: Any  # LanguageModelEmbedding, on the first stage
    output_layer: Any  # ColumnParallelLinear, on the last stage

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy: labels ``[b, s]``, logits ``[s, b, vocab/tp]`` -> loss ``[b, s]`` (fp32)."""
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        use_fp16 = getattr(self, "fp16_lm_cross_entropy", False) and logits.dtype == torch.float16
        loss = vocab_parallel_cross_entropy(logits if use_fp16 else logits.float(), labels)
        return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]

    def fused_loss_applies(self, hidden_states: torch.Tensor) -> bool:
        """Whether the loss runs fused with the output layer (``config.cross_entropy_loss_fusion``).

        Not with ``fp16_lm_cross_entropy`` on fp16 activations (that path keeps fp16 logits).
        """
        fp16_loss = getattr(self, "fp16_lm_cross_entropy", False) and hidden_states.dtype == torch.float16
        return bool(self.config.cross_entropy_loss_fusion) and not fp16_loss

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The word-embedding table on the first stage, the output layer's weight on the last."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def setup_embeddings_and_output_layer(self) -> None:
        """Tie the output layer to the word embeddings (a no-op when untied)."""
        if not self.share_embeddings_and_output_weights:
            return
        if self.pre_process:
            self.embedding.word_embeddings.weight.shared_embedding = True  # type: ignore[attr-defined]
        if self.post_process and not self.pre_process:
            weight = self.output_layer.weight
            weight.shared_embedding = True  # type: ignore[attr-defined]
            with torch.no_grad():
                weight.zero_()  # the all-reduce below then copies the first stage's table
        group = parallel_state.get_embedding_group()
        if (
            (self.pre_process or self.post_process)
            and parallel_state.get_pipeline_model_parallel_world_size() > 1
            and group is not None and dist.is_initialized()
        ):
            weight = self.shared_embedding_or_output_weight()
            assert weight is not None
            with torch.no_grad():
                dist.all_reduce(weight.data, group=group)

    def tie_output_layer_sharded_state_dict(self, sharded_state_dict: ShardedStateDict, prefix: str) -> None:
        """Store the last stage's tied output weight under the embedding's key, as a copy."""
        key = f"{prefix}output_layer.weight"
        if not (self.share_embeddings_and_output_weights and self.post_process and not self.pre_process):
            return
        sh_ten = sharded_state_dict.get(key)
        if not isinstance(sh_ten, ShardedTensor):
            return
        sh_ten.key = f"{prefix}embedding.word_embeddings.weight"
        replica = sh_ten.replica_id if isinstance(sh_ten.replica_id, tuple) else (sh_ten.replica_id,)
        sh_ten.replica_id = (1,) + tuple(replica[1:])  # never the main replica: the first stage writes it

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        self.tie_output_layer_sharded_state_dict(out, prefix)
        return out
