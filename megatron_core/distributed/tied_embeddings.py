"""Which parameter is this pipeline stage's copy of the tied word embedding."""

from __future__ import annotations

import torch

from megatron_core import parallel_state


def stage_tied_embedding_weight(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The (unwrapped) stage's copy of the shared word-embedding weight, or None if it holds none.

    The first stage's copy is the input embedding, the last stage's the output-layer weight; a
    stage in between, or a model without ``share_embeddings_and_output_weights``, has none.
    """
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return None
    getter = getattr(model, "shared_embedding_or_output_weight", None)
    if getter is not None:
        return getter()
    if getattr(model, "pre_process", True):
        return model.embedding.word_embeddings.weight  # type: ignore[union-attr, return-value]
    if getattr(model, "post_process", True):
        return model.output_layer.weight  # type: ignore[union-attr, return-value]
    return None


def needs_embedding_sync() -> bool:
    """True on the first and last pipeline stage when there is more than one (they share the weight)."""
    return (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        and parallel_state.is_rank_in_embedding_group()
    )
