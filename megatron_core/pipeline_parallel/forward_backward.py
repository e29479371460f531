"""``get_forward_backward_func()``: the schedule for the current pipeline layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_core import parallel_state
from megatron_core.pipeline_parallel.interleaved import forward_backward_pipelining_with_interleaving
from megatron_core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)


def get_forward_backward_func() -> Callable[..., list[Any]]:
    """Interleaved 1F1B with virtual pipelining, 1F1B when PP > 1, else no pipelining (as Megatron-Core)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
            return forward_backward_pipelining_with_interleaving
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining
