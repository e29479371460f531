"""A tiny MoE GPT, its single-process reference, and helpers to compare a rank's shards with it.

Weights on a rank are compared with the reference through the model's own ``sharded_state_dict()``
(global key = the EP=1 state-dict name, global offset), so "same weights / same gradients" is
checked on whole tensors whatever the (TP, EP) layout.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core import TransformerConfig
from megatron_core import parallel_state as ps
from megatron_core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron_core.models.gpt import GPTModel
from specs.gpt import get_gpt_layer_local_spec

VOCAB, SEQ, BATCH = 64, 8, 2


def moe_config(tp: int = 1, ep: int = 1, **overrides: Any) -> TransformerConfig:
    fields: dict[str, Any] = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        normalization="RMSNorm", activation_func="swiglu", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, moe_shared_expert_intermediate_size=16,
        moe_shared_expert_gate=True, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        init_method_std=0.2,  # a spread-out router: top-k choices far from ties
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_moe_gpt(config: TransformerConfig, grouped: bool = False) -> GPTModel:
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts,
                                    moe_grouped_gemm=grouped or config.moe_grouped_gemm)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False,
                    parallel_output=config.sequence_parallel,  # SP keeps the vocab split: gather_logits()
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def make_batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)} for _ in range(n)]


def run_step(model: GPTModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, mean loss) after one forward and backward (aux losses reach backward through the router)."""
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(batch["tokens"], position_ids, None)
    loss = model(batch["tokens"], position_ids, None, labels=batch["labels"]).mean()
    loss.backward()
    return logits.detach(), loss.detach()


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-split logits ``[b, s, V/tp]`` -> ``[b, s, V]`` (the identity at TP=1)."""
    group = ps.get_tensor_model_parallel_group()
    if ps.group_world_size(group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(ps.group_world_size(group))]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def local_slice(full: torch.Tensor, entry: Any) -> torch.Tensor:
    """The part of a full (EP=1, TP=1) tensor that ``entry`` (ShardedTensor or factory) holds."""
    if isinstance(entry, ShardedTensorFactory):
        return torch.cat([local_slice(full, part) for part in entry.build()], dim=0)
    assert isinstance(entry, ShardedTensor)
    index = tuple(slice(o, o + n) for o, n in zip(entry.global_offset[entry.prepend_axis_num:],
                                                  entry.local_shape, strict=True))
    return full[index]


def param_entries(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, Any]]:
    """Local parameter name -> (parameter, its sharded entry)."""
    sharded = model.sharded_state_dict()  # type: ignore[operator]
    return {name: (p, sharded[name]) for name, p in model.named_parameters()}


def is_expert_key(key: str) -> bool:
    return ".mlp.experts." in key
