"""ZeRO-1: AdamW whose state is split across data-parallel ranks, with resharding checkpoints.

The optimizer itself is torch's ``ZeroRedundancyOptimizer`` on the data-parallel group: each
parameter is owned by one data-parallel rank, which alone keeps its AdamW moments and updates it,
then broadcasts the new values to the other replicas. Gradients must already be averaged over the
group (both data-parallel wrappers of ``megatron_core.distributed`` do that), which is ZeRO stage 1.

What we add is its checkpoint. torch's ``state_dict()`` gathers every rank's state onto one rank
(``consolidate_state_dict``) in a layout tied to that ZeRO partition, which cannot reshard. Here
each owner instead contributes its moments as ``ShardedTensor``s under the same keys, with the
same tensor-parallel sharding as the plain-AdamW checkpoint of ``megatron_core.training``
(``optimizer.state.<param key>.exp_avg`` / ``.exp_avg_sq``) and itself as the main replica. So a
checkpoint saved with ZeRO at one (TP, PP, DP) loads into plain AdamW or into ZeRO at any other
layout, and the other way round: loading asks each rank only for the parameters it now owns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, ShardedTensorFactory

STATE_KEYS = ("exp_avg", "exp_avg_sq")


class DistributedOptimizer(ZeroRedundancyOptimizer):
    """AdamW sharded over the data-parallel group (ZeRO-1), checkpointed as sharded tensors.

    Args:
        model: the (unwrapped) model or pipeline stage whose parameters it trains.
        lr, weight_decay, betas, eps: AdamW's settings; weight decay applies to matrices only
            (biases and norm weights are not decayed), as in ``training.build_adamw``.
        data_parallel_group: defaults to ``parallel_state.get_data_parallel_group()``.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 data_parallel_group: dist.ProcessGroup | None = None) -> None:
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        group = data_parallel_group or parallel_state.get_data_parallel_group()
        if group is None and not dist.is_initialized():
            raise RuntimeError(
                "DistributedOptimizer shards AdamW over data-parallel ranks and needs torch.distributed; "
                "use training.build_adamw in a single process"
            )
        # foreach=False: the same per-parameter kernel as the plain AdamW, so both give equal updates.
        super().__init__(groups, optimizer_class=torch.optim.AdamW, process_group=group, lr=lr, betas=betas,
                         eps=eps, foreach=False)
        self.dp_group = group

    # ------------------------------------------------------------------ ownership
    def owned_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose AdamW state lives on this rank."""
        return [p for g in self.optim.param_groups for p in g["params"]]

    def _init_owned_state(self) -> None:
        for p in self.owned_parameters():
            state = self.optim.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                for name in STATE_KEYS:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, model: torch.nn.Module, model_sd: ShardedStateDict) -> ShardedStateDict:
        """This rank's AdamW moments as sharded tensors, laid out like their parameters.

        ``model_sd`` is ``model.sharded_state_dict()`` (the unwrapped model's); saving and loading
        both call this (for loading, the tensors are the buffers the checkpoint is read into).
        """
        self._init_owned_state()
        owned = {id(p) for p in self.owned_parameters()}
        out: ShardedStateDict = {}
        for key, param, entry in parameter_entries(model, model_sd):
            if id(param) not in owned:
                continue
            for name in STATE_KEYS:
                out[f"optimizer.state.{key}.{name}"] = _like(entry, f"optimizer.state.{key}.{name}",
                                                            self.optim.state[param][name])
        return out

    def common_state(self) -> dict[str, Any]:
        """AdamW's step count (the same on every rank), for the checkpoint's common state."""
        steps = [float(s["step"]) for s in self.optim.state.values() if "step" in s]
        step = torch.tensor([max(steps) if steps else 0.0])
        if self.dp_group is not None:
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.dp_group)  # a rank may own nothing yet
        return {"step": int(step.item())}

    def load_sharded_state_dict(self, model: torch.nn.Module, model_sd: ShardedStateDict, loaded: dict[str, Any],
                                common: dict[str, Any]) -> None:
        """Copy the loaded moments (as requested by ``sharded_state_dict``) and the step into this rank's state."""
        self._init_owned_state()
        owned = {id(p) for p in self.owned_parameters()}
        for key, param, _ in parameter_entries(model, model_sd):
            if id(param) not in owned:
                continue
            state = self.optim.state[param]
            state["step"] = torch.tensor(float(common["step"]))
            for name in STATE_KEYS:
                state[name].copy_(loaded[f"optimizer.state.{key}.{name}"])


def _like(entry: Any, key: str, data: torch.Tensor) -> Any:
    """``entry``'s sharding for ``data`` under ``key``; the owner is the data-parallel main replica."""
    replica = entry.replica_id
    if isinstance(replica, tuple) and replica:
        # Replica ids are (pipeline copy, TP copy, DP copy): only the owner holds this state.
        replica = replica[:-1] + (0,)
    if isinstance(entry, ShardedTensor):
        return dataclasses.replace(entry, key=key, data=data, dtype=data.dtype, replica_id=replica)
    return dataclasses.replace(entry, key=key, data=data, replica_id=replica)


def parameter_entries(model: torch.nn.Module, model_sd: ShardedStateDict) -> list[tuple[str, torch.nn.Parameter, Any]]:
    """(checkpoint key, parameter, sharded entry) of every trainable parameter.

    Matched by ``state_dict`` name first, then by storage (a module may expose a parameter under
    another name). Raises KeyError naming a parameter the model's sharded state dict lacks.
    """
    by_ptr = {e.data.data_ptr(): e for e in model_sd.values()
              if isinstance(e, ShardedTensor | ShardedTensorFactory) and e.data is not None}
    out = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        entry = model_sd.get(name) or by_ptr.get(param.data_ptr())
        if entry is None:
            raise KeyError(
                f"parameter {name!r} {tuple(param.shape)} is missing from {type(model).__name__}.sharded_state_dict(); "
                "the module that owns it must include it (keys equal to state_dict() keys)"
            )
        out.append((entry.key, param, entry))
    return out
