"""DistributedDataParallelConfig: how gradients are bucketed, reduced and (with the distributed optimizer) sharded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedDataParallelConfig:
    """Megatron-Core's data-parallel knobs (same names).

    Args:
        grad_reduce_in_fp32: accumulate and reduce gradients in fp32 whatever the parameter dtype.
            Default True here (Megatron-Core's default is False): bf16 weights then get fp32
            gradient accumulation over micro-batches and an fp32 reduction.
        overlap_grad_reduce: launch each bucket's reduction from the backward hooks as soon as every
            gradient of the bucket is final (last micro-batch only), overlapped with the rest of
            backward; off: all buckets are reduced after backward, in ``finish_grad_sync``.
        overlap_param_gather: with the distributed optimizer, the all-gather of updated parameters
            runs asynchronously after the step and each module waits for its buckets in a forward
            pre-hook of the next forward; off: the step waits for the all-gathers itself.
        use_distributed_optimizer: reduce-scatter gradients (each data-parallel rank keeps its
            shard of every bucket) and keep the parameters in contiguous buffers that the
            ``optimizer.DistributedOptimizer`` all-gathers into.
        bucket_size: elements per bucket (``ddp_bucket_size`` in the training settings); None:
            ``max(40_000_000, 1_000_000 * data-parallel size)`` as in Megatron-Core.
    """

    grad_reduce_in_fp32: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    use_distributed_optimizer: bool = False
    bucket_size: int | None = None

    def __post_init__(self) -> None:
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"DistributedDataParallelConfig.bucket_size={self.bucket_size}: must be >= 1 "
                             "elements, or None for the default")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("DistributedDataParallelConfig.overlap_param_gather=True needs "
                             "use_distributed_optimizer=True (only the distributed optimizer gathers parameters)")

    def resolved_bucket_size(self, data_parallel_size: int) -> int:
        """Elements per bucket for this data-parallel size."""
        if self.bucket_size is not None:
            return self.bucket_size
        return max(40_000_000, 1_000_000 * data_parallel_size)
