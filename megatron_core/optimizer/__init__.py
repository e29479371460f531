"""Optimizers beyond plain AdamW: the distributed optimizer (fp32 master shards over data-parallel ranks)."""

from megatron_core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron_core.optimizer.param_layout import parameter_entries

__all__ = ["DistributedOptimizer", "parameter_entries"]
