"""The distributed optimizer: AdamW on each data-parallel rank's shard of fp32 master weights.

Built over model chunks wrapped in ``DistributedDataParallel(ddp_config=...use_distributed_optimizer=True)``:
every bucket of their flat buffers is cut into ``d`` equal shards (``d`` = the size of the wrappers'
data-parallel group: data x context parallel ranks, where gradients are reduced, as in Megatron-Core)
and rank ``r`` of that group owns shard ``r`` of each. For its shards only, the rank keeps

* fp32 master weights (a view of the parameter buffer when the parameters are fp32; an fp32 copy
  when they are bf16/fp16, copied back into the parameter buffer after each step),
* AdamW's ``exp_avg`` / ``exp_avg_sq`` (fp32),

so optimizer memory per rank is ~1/d of plain AdamW's. A step: the reduce-scattered gradient shard
(fp32 by default) becomes the masters' gradient, gradients are clipped by the global norm (over the
whole model: every data-parallel shard, TP rank and pipeline stage counted once), torch's AdamW
(``foreach=False``, the same per-element arithmetic as plain AdamW; or, with ``fused=True``, torch's
fused kernel, as plain AdamW's ``training.fused_adamw``) updates the masters, and the
updated shards are all-gathered into every replica's parameters (asynchronously, waited for per
module in the next forward, with ``overlap_param_gather``). It is a ``torch.optim.AdamW`` over the
master shards, so the LR schedule sets its ``param_groups`` as usual.

Checkpoints: the moments (and the fp32 masters of low-precision parameters, ``fp32_param``) are
all-gathered over the data-parallel group per bucket and saved as sharded tensors laid out exactly
like their parameters (``optimizer.state.<param key>.exp_avg``; global shapes, TP sharding of the
parameter), each parameter's copy written by one data-parallel rank (round robin). The keys are
those of plain AdamW (``training.optimizer``), so a checkpoint resumes at any (TP, PP, DP), with or
without the distributed optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron_core.distributed import DistributedDataParallel
from megatron_core.distributed.param_and_grad_buffer import Bucket, ParamAndGradBuffer
from megatron_core.optimizer.param_layout import counts_in_grad_norm, parameter_entries

logger = logging.getLogger(__name__)

STATE_KEYS = ("exp_avg", "exp_avg_sq")
MASTER_KEY = "fp32_param"


@dataclass(eq=False)
class _Shard:
    """This rank's shard of one bucket: buffer range and the fp32 state living there."""

    buffer: ParamAndGradBuffer
    bucket: Bucket
    lo: int
    hi: int
    master: torch.Tensor  # fp32; a view of the parameter buffer when the parameters are fp32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


@dataclass(eq=False)
class _Fragment:
    """The piece ``[a, b)`` (buffer coordinates) of one parameter inside this rank's shard."""

    param: torch.nn.Parameter
    shard: _Shard
    a: int
    b: int
    master: torch.Tensor
    counted: bool = True


class DistributedOptimizer(torch.optim.AdamW):
    """AdamW over this data-parallel rank's shard of fp32 master weights (see the module docstring).

    Args:
        model: the model chunks (or one), each a :class:`DistributedDataParallel` built with
            ``DistributedDataParallelConfig(use_distributed_optimizer=True)``.
        lr, weight_decay, betas, eps: AdamW's settings; weight decay applies to matrices only
            (biases and norm weights are not decayed), as in ``training.build_adamw``.
        fused: torch's fused AdamW kernel on the master shards (``AdamW(fused=True)``: one pass per
            tensor instead of the per-tensor loop's several), as ``build_adamw(fused=True)``.

    Raises:
        TypeError: a chunk is not such a wrapper.
    """

    def __init__(self, model: DistributedDataParallel | list[DistributedDataParallel], lr: float,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 fused: bool = False) -> None:
        chunks = model if isinstance(model, list) else [model]
        for chunk in chunks:
            if not (isinstance(chunk, DistributedDataParallel) and chunk.ddp_config.use_distributed_optimizer):
                raise TypeError(
                    f"DistributedOptimizer needs each model chunk wrapped in DistributedDataParallel with "
                    f"ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True); got "
                    f"{type(chunk).__name__}"
                    + (" without use_distributed_optimizer" if isinstance(chunk, DistributedDataParallel) else "")
                )
        self.chunks = chunks
        self.dp_group = chunks[0].data_parallel_group
        self.shards: list[_Shard] = []
        self.fragments: list[_Fragment] = []
        for chunk in chunks:
            for buffer in chunk.buffers_by_dtype:
                for bucket in buffer.buckets:
                    self._add_shard(buffer, bucket)
        decay = [f.master for f in self.fragments if f.param.ndim >= 2]
        no_decay = [f.master for f in self.fragments if f.param.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # The same kernel as plain AdamW with the same setting, so both give equal updates.
        if fused:
            super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=True)
        else:
            super().__init__(groups, lr=lr, betas=betas, eps=eps, foreach=False)
        for f in self.fragments:  # the moments are views of the shard's flat state (gathered for checkpoints)
            off_a, off_b = f.a - f.shard.lo, f.b - f.shard.lo
            self.state[f.master] = {"step": self._step_tensor(0.0, f.master), "exp_avg": f.shard.exp_avg[off_a:off_b],
                                    "exp_avg_sq": f.shard.exp_avg_sq[off_a:off_b]}
        self._mark_counted()

    def _step_tensor(self, value: float, master: torch.Tensor) -> torch.Tensor:
        """AdamW's step count as its kernel wants it: on the master's device for the fused kernel."""
        if self.defaults.get("fused"):
            return torch.tensor(value, dtype=torch.float32, device=master.device)
        return torch.tensor(value)

    def _add_shard(self, buffer: ParamAndGradBuffer, bucket: Bucket) -> None:
        lo, hi = buffer.shard_range(bucket)
        assert buffer.param_data is not None
        own = buffer.param_data[lo:hi]
        master = own if own.dtype == torch.float32 else own.float()
        shard = _Shard(buffer, bucket, lo, hi, master, torch.zeros_like(master), torch.zeros_like(master))
        self.shards.append(shard)
        for p in bucket.params:
            ps, pe = buffer.ranges[id(p)]
            a, b = max(lo, ps), min(hi, pe)
            if a < b:
                self.fragments.append(_Fragment(p, shard, a, b, master[a - lo:b - lo]))

    def _mark_counted(self) -> None:
        counted: dict[int, bool] = {}
        for chunk in self.chunks:
            inner = chunk.module
            for _, param, entry in parameter_entries(inner, inner.sharded_state_dict()):  # type: ignore[operator]
                counted[id(param)] = counts_in_grad_norm(entry)
        for f in self.fragments:
            f.counted = counted.get(id(f.param), True)

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new accumulation in every chunk's gradient buffers."""
        del set_to_none
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        for f in self.fragments:
            f.master.grad = None

    def _prepare_grads(self) -> None:
        """Point each master fragment's ``.grad`` at its reduce-scattered gradient (None if unused)."""
        chunk_of = {id(p): c for c in self.chunks for p in c.params}
        for f in self.fragments:
            if not chunk_of[id(f.param)].used(f.param):
                f.master.grad = None
                continue
            grad = f.shard.buffer.grad_data[f.a:f.b]
            f.master.grad = grad if grad.dtype == torch.float32 else grad.float()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradients (every shard, TP rank and stage counted once); scale to ``max_norm``.

        Call after ``finalize_model_grads`` (the schedules do) and before :meth:`step`. ``max_norm <= 0``
        only measures.
        """
        self._prepare_grads()
        device = self.shards[0].master.device if self.shards else None
        dense, expert = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
        for f in self.fragments:
            if f.counted and f.master.grad is not None:
                (expert if f.shard.buffer.expert else dense).add_(f.master.grad.double().pow(2).sum())
        _all_reduce(dense, self.dp_group)
        if any(shard.buffer.expert for shard in self.shards):
            # Experts: shards over the expert-data-parallel group, other experts over expert parallelism.
            _all_reduce(expert, self.chunks[0].expert_data_parallel_group)
            _all_reduce(expert, parallel_state.get_expert_model_parallel_group())
        squared = dense + expert
        _all_reduce(squared, parallel_state.get_model_parallel_group())
        total = squared.sqrt().float()
        if max_norm > 0:
            # torch.nn.utils.clip_grads_with_norm_'s arithmetic, on the shards.
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for f in self.fragments:
                if f.master.grad is not None:
                    f.master.grad.mul_(coef.to(f.master.grad.dtype))
        self._grads_ready = True
        return float(total)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """AdamW on the master shards, copy into the parameter buffers, all-gather the parameters."""
        if closure is not None:
            raise ValueError("DistributedOptimizer.step does not take a closure")
        if not getattr(self, "_grads_ready", False):
            self._prepare_grads()
        self._grads_ready = False
        super().step()
        for shard in self.shards:
            own = shard.buffer.param_data[shard.lo:shard.hi]  # type: ignore[index]
            if shard.master.data_ptr() != own.data_ptr():
                own.copy_(shard.master)
        for chunk in self.chunks:
            chunk.start_param_sync()
            if not chunk.ddp_config.overlap_param_gather:
                chunk.finish_param_sync()
        return None

    def finish_param_sync(self) -> None:
        """Wait for pending parameter all-gathers (before reading parameters outside a forward)."""
        for chunk in self.chunks:
            chunk.finish_param_sync()

    # ------------------------------------------------------------------ measurements
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: moments, plus fp32 masters that are copies."""
        total = 0
        for shard in self.shards:
            total += shard.exp_avg.nbytes + shard.exp_avg_sq.nbytes
            own = shard.buffer.param_data[shard.lo:shard.hi]  # type: ignore[index]
            if shard.master.data_ptr() != own.data_ptr():
                total += shard.master.nbytes
        return total

    # ------------------------------------------------------------------ checkpoint
    def _gathered(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per parameter id, its full (TP-local) fp32 state tensors, all-gathered over data parallelism."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for shard in self.shards:
            names = {"exp_avg": shard.exp_avg, "exp_avg_sq": shard.exp_avg_sq}
            low_precision = shard.buffer.param_dtype != torch.float32
            if low_precision:
                names[MASTER_KEY] = shard.master
            for name, local in names.items():
                full = torch.empty(shard.bucket.numel, dtype=local.dtype, device=local.device)
                if shard.buffer.dp_size > 1:
                    dist.all_gather_single(full, local.contiguous(), group=shard.buffer.group)
                else:
                    full.copy_(local)
                for p in shard.bucket.params:
                    ps, pe = shard.buffer.ranges[id(p)]
                    off = shard.bucket.offset
                    out.setdefault(id(p), {})[name] = full[ps - off:pe - off].view(p.shape)
        return out

    def sharded_state_dict(self, model: torch.nn.Module, model_sd: ShardedStateDict) -> ShardedStateDict:
        """The optimizer state as sharded tensors laid out like their parameters (a DP collective).

        ``model`` / ``model_sd``: the unwrapped model and its ``sharded_state_dict()``. Saving and
        loading both call this (for loading, the tensors are the buffers the checkpoint is read into).
        """
        gathered = self._gathered()
        buffer_of = {id(p): buf for c in self.chunks for buf in c.buffers_by_dtype for p in buf.params}
        out: ShardedStateDict = {}
        for i, (key, param, entry) in enumerate(parameter_entries(model, model_sd)):
            buffer = buffer_of[id(param)]
            for name, data in gathered.get(id(param), {}).items():
                new_key = f"optimizer.state.{key}.{name}"
                # Every replica holds the gathered copy; one per group writes it (round robin).
                out[new_key] = _like(entry, new_key, data, (buffer.dp_rank - i) % buffer.dp_size)
        return out

    def common_state(self) -> dict[str, Any]:
        """AdamW's step count (the same on every rank), for the checkpoint's common state."""
        steps = [float(s["step"]) for s in self.state.values() if "step" in s]
        return {"step": int(max(steps)) if steps else 0}

    def load_sharded_state_dict(self, model: torch.nn.Module, model_sd: ShardedStateDict, loaded: dict[str, Any],
                                common: dict[str, Any]) -> None:
        """Copy loaded state (keys as in :meth:`sharded_state_dict`) into this rank's shards.

        The model must be loaded first: without ``fp32_param`` in the checkpoint (saved by plain
        AdamW or with fp32 parameters) the masters start from the loaded parameters.
        """
        keys = {id(param): key for key, param, _ in parameter_entries(model, model_sd)}
        for f in self.fragments:
            key = keys[id(f.param)]
            ps, _ = f.shard.buffer.ranges[id(f.param)]
            lo, hi = f.a - f.shard.lo, f.b - f.shard.lo
            for name in (*STATE_KEYS, MASTER_KEY):
                source = loaded.get(f"optimizer.state.{key}.{name}")
                target = f.master if name == MASTER_KEY else getattr(f.shard, name)[lo:hi]
                if source is None and name == MASTER_KEY:
                    source = f.param.detach()
                if source is None:
                    raise KeyError(f"optimizer.state.{key}.{name} missing from the loaded checkpoint state")
                target.copy_(source.reshape(-1)[f.a - ps:f.b - ps])
            self.state[f.master]["step"] = self._step_tensor(float(common["step"]), f.master)


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    if parallel_state.group_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)


def _like(entry: Any, key: str, data: torch.Tensor, dp_replica: int) -> Any:
    """``entry``'s sharding for ``data`` under ``key``; data-parallel copy number ``dp_replica``."""
    replica = entry.replica_id
    if isinstance(replica, tuple) and replica:
        replica = replica[:-1] + (dp_replica,)  # replica ids are (pipeline copy, TP copy, DP copy)
    if isinstance(entry, ShardedTensor):
        return dataclasses.replace(entry, key=key, data=data, dtype=data.dtype, replica_id=replica)
    return dataclasses.replace(entry, key=key, data=data, replica_id=replica)
