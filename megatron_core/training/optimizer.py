"""AdamW wiring: parameter groups, tensor-parallel-aware gradient clipping, sharded optimizer state.

Which parameters are split across tensor-parallel ranks is read from the model's own
``sharded_state_dict()`` (the one place that knows), so clipping and checkpointing need no
per-layer knowledge:

* a parameter cut into fragments is a *shard*: every TP rank holds a different piece and counts it
  in the gradient norm;
* a parameter whole on every TP rank (norms, row-parallel biases) is *replicated*: its gradient is
  identical on every TP rank (the model's collectives guarantee it), so only TP rank 0 counts it;
* a parameter another pipeline stage also holds (the last stage's copy of the tied word embedding,
  stored as a non-main replica along the pipeline axis) is counted by the first stage only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron_core.optimizer.param_layout import (  # noqa: F401  (re-exported: training's public names)
    OptimizerStateError,
    counts_in_grad_norm,
    is_pipeline_copy,
    is_tensor_parallel_shard,
    parameter_entries,
)

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed).

    ``fused``: torch's fused AdamW kernel (one pass over each parameter; on CPU ~10x faster than the
    per-tensor loop at GPT-2 small). Deterministic, so a resumed run still equals a straight one, but
    its rounding differs from the per-tensor loop's (~1e-7 per step), hence off by default: the
    default stays equal to plain ``torch.optim.AdamW(foreach=False)`` and to the distributed optimizer.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    # foreach=False: one code path on every TP size, so resumed and straight runs are bit-equal.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def model_sharded_state_dict(model: torch.nn.Module) -> ShardedStateDict:
    """``model.sharded_state_dict()``, with a clear error for a model that lacks one."""
    if not hasattr(model, "sharded_state_dict"):
        raise TypeError(f"{type(model).__name__} has no sharded_state_dict(); subclass MegatronModule")
    return cast(Any, model).sharded_state_dict()


def grad_norm_plan(model: torch.nn.Module, model_sd: ShardedStateDict | None = None,
                   ) -> tuple[list[torch.nn.Parameter], list[bool]]:
    """The trainable parameters, and per parameter: does this rank count it in the global norm?"""
    model_sd = model_sharded_state_dict(model) if model_sd is None else model_sd
    params, flags = [], []
    for _, param, entry in parameter_entries(model, model_sd):
        params.append(param)
        flags.append(counts_in_grad_norm(entry))
    return params, flags


def clip_grad_norm(params: list[torch.nn.Parameter], counted: list[bool], max_norm: float) -> float:
    """Global L2 norm of the gradients over all model-parallel ranks; scale them to ``max_norm``.

    At TP=1 and PP=1 this is exactly ``torch.nn.utils.clip_grad_norm_``; otherwise the local norms
    of the counted gradients are summed (squared) over the model-parallel group (every TP rank of
    every pipeline stage of one replica) first, so every rank computes the same norm and applies
    the same scale. ``max_norm <= 0`` only measures. MoE experts (``param.allreduce = False``) differ
    across expert-parallel ranks, so their squares are summed over the expert-parallel group too.
    """
    device = params[0].device if params else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float64, device=device)
    for expert in (False, True):
        grads = [p.grad for p, c in zip(params, counted, strict=True)
                 if c and p.grad is not None and _is_expert(p) == expert]
        part = torch.nn.utils.get_total_norm(grads).double() ** 2 if grads else \
            torch.zeros((), dtype=torch.float64, device=device)
        ep_group = parallel_state.get_expert_model_parallel_group()
        if expert and parallel_state.group_world_size(ep_group) > 1:
            dist.all_reduce(part, group=ep_group)
        squared = squared + part
    group = parallel_state.get_model_parallel_group()
    if parallel_state.group_world_size(group) > 1:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt().float()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)


def _is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def _init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state for every parameter (as its first step would), so it can be loaded into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                for name in OPTIMIZER_STATE_KEYS:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                                 model_sd: ShardedStateDict) -> ShardedStateDict:
    """AdamW's moments as sharded tensors laid out exactly like their parameters.

    Keys are ``optimizer.state.<param key>.exp_avg`` / ``.exp_avg_sq``; a moment is sharded (and
    reshards across TP sizes) the same way as its parameter.
    """
    _init_state(optimizer)
    out: ShardedStateDict = {}
    for key, param, entry in parameter_entries(model, model_sd):
        state = optimizer.state[param]
        for name in OPTIMIZER_STATE_KEYS:
            new_key = f"optimizer.state.{key}.{name}"
            if isinstance(entry, ShardedTensor):
                out[new_key] = dataclasses.replace(entry, key=new_key, data=state[name], dtype=state[name].dtype)
            else:
                out[new_key] = dataclasses.replace(entry, key=new_key, data=state[name])
    return out


def optimizer_common_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The non-tensor part of the optimizer state: AdamW's step count."""
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    return {"step": int(max(steps)) if steps else 0}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, model_sd: ShardedStateDict,
                         loaded: dict[str, Any], common: dict[str, Any]) -> None:
    """Copy loaded moments (keys as in ``optimizer_sharded_state_dict``) and the step into ``optimizer``."""
    _init_state(optimizer)
    for key, param, _ in parameter_entries(model, model_sd):
        state = optimizer.state[param]
        state["step"] = torch.tensor(float(common["step"]))
        for name in OPTIMIZER_STATE_KEYS:
            state[name].copy_(loaded[f"optimizer.state.{key}.{name}"])
