"""What happens to gradients after the last backward of a step, and the tied-embedding glue.

With pipeline parallelism and tied input/output embeddings, the first stage owns the word
embedding and the last stage holds a *copy* as its output-layer weight. Like Megatron-LM, the two
copies start equal (:func:`initialize_tied_embeddings` broadcasts the first stage's) and stay equal
because their gradients are summed over the embedding group before every optimizer step
(:func:`allreduce_tied_embedding_grads`), so both see the gradient of the single shared weight.
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


def initialize_tied_embeddings(model: torch.nn.Module) -> None:
    """Make the last stage's output-layer weight equal to the first stage's word embedding.

    A collective over the embedding group: every first- and last-stage rank calls it once after
    building its stage (other ranks may call it too; it does nothing there).
    """
    if not _needs_embedding_sync():
        return
    weight = tied_embedding_weight(model)
    if weight is None:
        return
    group = parallel_state.get_embedding_group()
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        dist.broadcast(weight.data, src=src, group=group)


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
    """Finish gradient reduction for one step: data-parallel average, then tied-embedding sum.

    The two reductions are linear and over different ranks, so their order does not matter. torch
    DDP has already reduced during backward; our :class:`DistributedDataParallel` reduces here.
    """
    from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel

    for chunk in model:
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_grad_sync()
        allreduce_tied_embedding_grads(chunk)
