"""What happens to gradients after the last backward of a step.

Three reductions, all linear and over disjoint concerns, so their order does not matter:

* data parallel: the average over replicas (torch DDP has done it during backward already; our
  bucketed :class:`DistributedDataParallel` does it here);
* tensor parallel: the sum over TP ranks of gradients each rank holds only in part (norms under
  sequence parallelism, q/k norms), via ``transformer.utils.allreduce_tp_partial_grads``;
* tied embeddings across pipeline stages: the first stage owns the word embedding and the last
  holds a copy as its output-layer weight (``LanguageModule.setup_embeddings_and_output_layer``
  makes them equal at build time). Summing their gradients over the embedding group keeps them
  equal: both then apply the gradient of the one shared weight, as in Megatron-LM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_core import parallel_state


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any data-parallel wrappers (torch DDP or ours)."""
    from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel | torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def tied_embedding_weight(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """This stage's copy of the shared word-embedding weight, or None if it holds none.

    The first stage's copy is the input embedding, the last stage's the output-layer weight; a
    stage in between, or a model without ``share_embeddings_and_output_weights``, has none.
    """
    inner = unwrap_model(model)
    if not getattr(inner, "share_embeddings_and_output_weights", False):
        return None
    getter = getattr(inner, "shared_embedding_or_output_weight", None)
    if getter is not None:
        return getter()
    if getattr(inner, "pre_process", True):
        return inner.embedding.word_embeddings.weight  # type: ignore[union-attr, return-value]
    if getattr(inner, "post_process", True):
        return inner.output_layer.weight  # type: ignore[union-attr, return-value]
    return None


def _needs_embedding_sync() -> bool:
    return (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        and parallel_state.is_rank_in_embedding_group()
    )


def allreduce_tied_embedding_grads(model: torch.nn.Module) -> None:
    """Sum the word-embedding gradient of the first and last pipeline stage (no-op elsewhere)."""
    if not _needs_embedding_sync():
        return
    weight = tied_embedding_weight(model)
    if weight is None:
        return
    grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    dist.all_reduce(grad, group=parallel_state.get_embedding_group())
    weight.grad = grad


def finalize_model_grads(model: list[torch.nn.Module]) -> None:
    """Finish gradient reduction for one step (see the module docstring); the schedules call it.

    Call it exactly once per step, after the last backward and before clipping / the optimizer.
    """
    from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel
    from megatron_core.transformer.utils import allreduce_tp_partial_grads

    for chunk in model:
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_grad_sync()
        allreduce_tp_partial_grads(unwrap_model(chunk))
        allreduce_tied_embedding_grads(chunk)
