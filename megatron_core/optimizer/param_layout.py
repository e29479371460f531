"""Where each trainable parameter sits in the checkpoint layout, read from the model's ``sharded_state_dict()``.

Used by the optimizers for two things: the checkpoint key of a parameter's optimizer state, and
whether this rank counts a parameter in the global gradient norm:

* a parameter cut into fragments is a *shard*: every TP rank holds a different piece and counts it;
* a parameter whole on every TP rank (norms, row-parallel biases) is *replicated*: its gradient is
  identical on every TP rank (the model's collectives guarantee it), so only TP rank 0 counts it;
* a parameter another pipeline stage also holds (the last stage's copy of the tied word embedding,
  stored as a non-main replica along the pipeline axis) is counted by the first stage only.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, ShardedTensorFactory


class OptimizerStateError(KeyError):
    """A parameter has no matching entry in the model's sharded state dict."""


def parameter_entries(model: torch.nn.Module, model_sd: ShardedStateDict) -> list[tuple[str, torch.nn.Parameter, Any]]:
    """(checkpoint key, parameter, sharded entry) of every trainable parameter.

    Matched by ``state_dict`` name first, then by storage and shape (a module may expose a
    parameter under another name, e.g. tied weights).

    Raises:
        OptimizerStateError: a parameter the model's sharded state dict lacks (named).
    """
    by_storage = {(e.data.data_ptr(), tuple(e.data.shape)): e for e in model_sd.values()
                  if isinstance(e, ShardedTensor | ShardedTensorFactory) and e.data is not None}
    out = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        entry = model_sd.get(name) or by_storage.get((param.data_ptr(), tuple(param.shape)))
        if entry is None:
            raise OptimizerStateError(
                f"parameter {name!r} {tuple(param.shape)} is missing from {type(model).__name__}.sharded_state_dict(); "
                "the module that owns it must include it (keys equal to state_dict() keys)"
            )
        out.append((entry.key, param, entry))
    return out


def is_tensor_parallel_shard(entry: Any) -> bool:
    """True when the sharded entry is cut into pieces (each TP rank holds a different one)."""
    if isinstance(entry, ShardedTensorFactory):
        return True  # factories wrap split tensors (e.g. the gated fc1)
    fragments = entry.axis_fragmentations or ()
    return any(f > 1 for f in fragments[entry.prepend_axis_num:])


def is_pipeline_copy(entry: Any) -> bool:
    """True for a copy of a parameter that another pipeline stage owns (replica id ``(1, ...)``)."""
    replica = getattr(entry, "replica_id", 0)
    return isinstance(replica, tuple) and len(replica) > 0 and replica[0] != 0


def counts_in_grad_norm(entry: Any) -> bool:
    """Does this rank count the parameter of ``entry`` in the global gradient norm (see the module docstring)?"""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return (is_tensor_parallel_shard(entry) or tp_rank == 0) and not is_pipeline_copy(entry)
