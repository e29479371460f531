"""Pipeline parallelism: stage-to-stage communication and the micro-batch schedules."""

from megatron_core.pipeline_parallel.forward_backward import get_forward_backward_func
from megatron_core.pipeline_parallel.interleaved import forward_backward_pipelining_with_interleaving
from megatron_core.pipeline_parallel.p2p_communication import PipelineShapeError
from megatron_core.pipeline_parallel.schedules import (
    ScheduleError,
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)

__all__ = [
    "PipelineShapeError",
    "ScheduleError",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
]
