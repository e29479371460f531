"""What happens to gradients after the last backward of a step: the one gradient-finalisation path.

The schedules (and so the Trainer, which runs every step through ``get_forward_backward_func()``)
call :func:`finalize_model_grads` once per step. Three reductions, all sums over disjoint groups:

* tensor parallel: the sum over TP ranks of gradients each rank holds only in part (norms under
  sequence parallelism, q/k norms), via ``transformer.utils.allreduce_tp_partial_grads``;
* tied embeddings across pipeline stages: the first stage owns the word embedding and the last
  holds a copy as its output-layer weight (``LanguageModule.setup_embeddings_and_output_layer``
  makes them equal at build time). Summing their gradients over the embedding group keeps them
  equal: both then apply the gradient of the one shared weight, as in Megatron-LM;
* data parallel: the average over replicas, bucket by bucket, in :class:`DistributedDataParallel`
  (launched during backward with ``overlap_grad_reduce``).

The first two run before the data-parallel reduction of the buckets that hold those gradients
(their "late" buckets): after a reduce-scatter a rank holds only its own shard of a bucket, and the
tied embedding sits at different buffer offsets on the first and last stage.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel
from megatron_core.distributed.tied_embeddings import needs_embedding_sync, stage_tied_embedding_weight
from megatron_core.transformer.utils import allreduce_tp_partial_grads


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any data-parallel wrappers (torch DDP or ours)."""
    while isinstance(model, DistributedDataParallel | torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def tied_embedding_weight(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """This stage's copy of the shared word-embedding weight, or None if it holds none (see
    :func:`~megatron_core.distributed.tied_embeddings.stage_tied_embedding_weight`)."""
    return stage_tied_embedding_weight(unwrap_model(model))


def allreduce_tied_embedding_grads(model: torch.nn.Module, grad_attr: str = "grad") -> None:
    """Sum the word-embedding gradient (``param.<grad_attr>``) of the first and last pipeline stage."""
    if not needs_embedding_sync():
        return
    weight = tied_embedding_weight(model)
    if weight is None:
        return
    grad = getattr(weight, grad_attr, None)
    if grad is None:  # this stage's copy got no gradient this step: it contributes zeros
        grad = torch.zeros_like(weight)
        setattr(weight, grad_attr, grad)
    dist.all_reduce(grad, group=parallel_state.get_embedding_group())


def _cross_group_sums(model: torch.nn.Module, grad_attr: str) -> None:
    allreduce_tp_partial_grads(unwrap_model(model), grad_attr=grad_attr)
    allreduce_tied_embedding_grads(model, grad_attr=grad_attr)


def finalize_model_grads(model: list[torch.nn.Module]) -> None:
    """Finish gradient reduction for one step (see the module docstring); the schedules call it.

    Call it exactly once per step, after the last backward and before clipping / the optimizer.
    ``model`` is the list of model chunks (one without virtual pipelining), each wrapped in our
    :class:`DistributedDataParallel` or not (then its ``param.grad`` are finished in place).
    """
    for chunk in model:
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_grad_sync(before_late_reduce=functools.partial(_cross_group_sums, chunk, "main_grad"))
        else:
            _cross_group_sums(chunk, "grad")
