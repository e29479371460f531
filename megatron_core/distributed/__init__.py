"""Data parallelism and the gradient reductions that end a training step."""

from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel, wrap_data_parallel
from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.distributed.finalize_model_grads import (
    allreduce_tied_embedding_grads,
    finalize_model_grads,
    tied_embedding_weight,
    unwrap_model,
)

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "allreduce_tied_embedding_grads",
    "finalize_model_grads",
    "tied_embedding_weight",
    "unwrap_model",
    "wrap_data_parallel",
]
