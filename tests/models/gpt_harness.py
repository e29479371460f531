"""A tiny tied-embedding GPT trained under any (TP, PP, DP) layout, and its single-process reference.

Weights come from one full single-process model and are copied into each rank's shards through
the model's own ``sharded_state_dict()`` (key + global offset), so every layout starts from
bit-identical weights whatever the RNG consumption of its build. Gradients are gathered back
the same way, by checkpoint key, so "gathered gradients equal a single process" compares whole
tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_core import TransformerConfig
from megatron_core import parallel_state as ps
from megatron_core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron_core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    unwrap_model,
    wrap_data_parallel,
)
from megatron_core.models.gpt import GPTModel
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.training.optimizer import build_adamw
from specs.gpt import get_gpt_layer_local_spec

VOCAB, SEQ, LAYERS, HIDDEN, HEADS, GLOBAL_BATCH = 64, 8, 4, 32, 4, 8
LR = 1e-3


def make_config(tp: int = 1, pp: int = 1, **overrides: Any) -> TransformerConfig:
    fields: dict[str, Any] = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, hidden_dropout=0.0,
                                  attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return TransformerConfig(**{**fields, **overrides})


def build_gpt(config: TransformerConfig) -> GPTModel:
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def full_weights(seed: int = 0, **overrides: Any) -> dict[str, torch.Tensor]:
    """The single-process model's weights by checkpoint key (``overrides``: config fields, e.g. num_layers)."""
    torch.manual_seed(seed)
    model = GPTModel(make_config(**overrides), get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
            and not k.endswith("_extra_state")}


def make_steps(num_steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """One global batch ``[GLOBAL_BATCH, SEQ]`` of tokens and labels per optimizer step."""
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)} for _ in range(num_steps)]


def _sharded_tensors(model: torch.nn.Module) -> list[ShardedTensor]:
    entries = unwrap_model(model).sharded_state_dict()  # type: ignore[operator]
    for entry in entries.values():
        assert isinstance(entry, ShardedTensor), f"unexpected {type(entry).__name__} in a gelu GPT"
    return list(entries.values())


def load_full(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy each local shard out of the full tensors (the last stage's tied copy included)."""
    with torch.no_grad():
        for sh in _sharded_tensors(model):
            assert sh.data is not None
            sh.data.copy_(full[sh.key][sh.global_slice()].reshape(sh.local_shape))


def sharded_grads(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], tuple[slice, ...], Any, torch.Tensor]]:
    """(key, global shape, global slice, replica id, grad) of every parameter of this rank."""
    params = {p.data_ptr(): p for p in unwrap_model(model).parameters()}
    out = []
    for sh in _sharded_tensors(model):
        assert sh.data is not None
        param = params.get(sh.data.data_ptr())
        if param is None or param.grad is None:
            continue
        out.append((sh.key, sh.global_shape, sh.global_slice(), sh.replica_id, param.grad.detach().clone()))
    return out


def assemble(per_rank: list[list[Any]]) -> tuple[dict[str, torch.Tensor], float]:
    """Full gradients from the main replicas; and the largest gap between a copy and its main replica."""
    full: dict[str, torch.Tensor] = {}
    for entries in per_rank:
        for key, shape, box, replica, grad in entries:
            if is_main_replica(replica):
                target = full.setdefault(key, torch.zeros(shape))
                target[box] = grad.reshape(target[box].shape)
    copy_gap = 0.0
    for entries in per_rank:
        for key, _, box, replica, grad in entries:
            if not is_main_replica(replica):
                copy_gap = max(copy_gap, (full[key][box] - grad.reshape(full[key][box].shape)).abs().max().item())
    return full, copy_gap


def micro_batches(step: dict[str, torch.Tensor], num_microbatches: int) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's share of a global batch, cut into micro-batches."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    mbs = per_rank // num_microbatches
    tokens = step["tokens"][rank * per_rank:(rank + 1) * per_rank]
    labels = step["labels"][rank * per_rank:(rank + 1) * per_rank]
    positions = torch.arange(SEQ).expand(mbs, SEQ)
    return [{"tokens": tokens[i * mbs:(i + 1) * mbs], "labels": labels[i * mbs:(i + 1) * mbs],
             "position_ids": positions} for i in range(num_microbatches)]


def _loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = output.float().mean()  # [b, s] per-token losses -> micro-batch mean
    return loss, {"loss": loss.detach().clone()}


def gpt_forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), _loss_func


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: list[dict[str, torch.Tensor]],
                num_microbatches: int) -> tuple[list[float], list[Any]]:
    """One schedule + AdamW step per global batch.

    Returns:
        The global mean loss of each step (on every rank) and this rank's first-step gradients.
    """
    losses: list[float] = []
    first_grads: list[Any] = []
    for i, step in enumerate(steps):
        optimizer.zero_grad(set_to_none=True)
        batches = micro_batches(step, num_microbatches)
        dicts = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=batches[0]["tokens"].shape[0])
        if i == 0:
            first_grads = sharded_grads(model)
        optimizer.step()
        losses.append(_global_mean_loss(dicts))
    return losses, first_grads


def evaluate(model: torch.nn.Module, step: dict[str, torch.Tensor], num_microbatches: int) -> float:
    """Forward-only mean loss of one global batch (every rank gets it)."""
    batches = micro_batches(step, num_microbatches)
    with torch.no_grad():
        dicts = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=True)
    return _global_mean_loss(dicts)


def _global_mean_loss(dicts: list[dict[str, torch.Tensor]]) -> float:
    """Mean over micro-batches and data-parallel replicas, broadcast from the last stage to all."""
    total = torch.tensor([sum(d["loss"].item() for d in dicts), float(len(dicts))], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)  # only the last stages contribute; every rank gets the sum
    return (total[0] / total[1]).item()


def setup(tp: int, pp: int, full: dict[str, torch.Tensor], **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """This rank's stage, loaded from ``full``, wrapped for data parallelism, and its AdamW."""
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp)
    stage = build_gpt(make_config(tp, pp, **overrides))
    load_full(stage, full)
    wrapped = wrap_data_parallel(stage)
    return wrapped, build_adamw(stage, lr=LR)


def setup_distributed_optimizer(tp: int, pp: int, full: dict[str, torch.Tensor], bucket_size: int | None = None,
                                overlap: bool = False, **config: Any) -> tuple[DistributedDataParallel,
                                                                               DistributedOptimizer]:
    """This rank's stage loaded from ``full``, wrapped for the distributed optimizer, and the optimizer."""
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp)
    stage = build_gpt(make_config(tp, pp, **config))
    load_full(stage, full)
    ddp = DistributedDataParallel(stage, bucket_size=bucket_size, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=overlap, overlap_param_gather=overlap))
    return ddp, DistributedOptimizer(ddp, lr=LR)


def reference(full: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]]
              ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single process, whole global batch at once: the loss curve and the first step's gradients."""
    model, optimizer = setup(1, 1, full)
    losses, first_grads = [], {}
    for i, step in enumerate(steps):
        optimizer.zero_grad(set_to_none=True)
        positions = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ)
        loss = model(step["tokens"], positions, None, labels=step["labels"]).float().mean()
        loss.backward()
        if i == 0:
            first_grads = assemble([sharded_grads(model)])[0]
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads
