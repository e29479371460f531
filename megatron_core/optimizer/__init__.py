"""Optimizers beyond plain AdamW: ZeRO-1 (state sharded over data-parallel ranks)."""

from megatron_core.optimizer.distrib_optimizer import DistributedOptimizer, parameter_entries

__all__ = ["DistributedOptimizer", "parameter_entries"]
