"""Data parallelism: gradients accumulated in contiguous buckets, reduced per bucket, overlapped with backward.

:class:`DistributedDataParallel` wraps a model (or a pipeline stage, or one virtual-pipeline
chunk) at every pipeline size. Its parameters' gradients accumulate, over the micro-batches of a
step, into the flat buffers of :mod:`param_and_grad_buffer` (``param.main_grad``; a
post-accumulate-grad hook on every parameter adds ``param.grad`` there and frees it). The step's
last backward (the schedules run the others under :meth:`no_sync`) then reduces each bucket:

* ``overlap_grad_reduce``: the hook launches a bucket's asynchronous all-reduce (reduce-scatter
  with the distributed optimizer) as soon as the bucket's last gradient is final, while backward
  goes on through earlier layers; ``finish_grad_sync`` only waits.
* otherwise ``finish_grad_sync`` (called once per step by the schedules through
  ``finalize_model_grads``) launches every bucket's reduction and waits.

Buckets holding gradients that another group must sum first (tensor-parallel partial gradients of
sequence-parallel norms, the tied embedding across pipeline stages) are "late": reduced in
``finish_grad_sync`` after ``finalize_model_grads`` has done those sums (a reduce-scatter leaves
each rank only its own shard, so the sums must come first).

Every reduction divides by the data-parallel size: the result is the gradient of the mean loss over
the global batch. Parameters start equal on every replica (broadcast from data-parallel rank 0).
Without the distributed optimizer, ``finish_grad_sync`` also sets ``param.grad`` to the reduced
gradient (a view of the buffer when the dtypes agree), so any torch optimizer can step. torch's
DDP is not used: it decides in ``forward`` whether the *next* backward reduces, but 1F1B runs the
backwards of up to ``p - 1`` earlier micro-batches after the last forward.

Accumulation restarts at the first forward with gradients enabled after ``finish_grad_sync``
(or at ``zero_grad_buffer()``, Megatron-Core's explicit call), so a loop that only calls
``optimizer.zero_grad()`` works too. Forwards must go through the wrapper.

Expert parameters (mixture of experts; Megatron-Core's marker ``param.allreduce = False``, set by
the parallel linears built with ``is_expert=True``) get buffers of their own, summed over the
expert-data-parallel group (the ranks holding the same experts) and scaled by 1 / data-parallel
size like every other gradient: the token exchange has already brought every expert-parallel
rank's tokens to the experts. They are broadcast at construction over that group too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.distributed.param_and_grad_buffer import ParamAndGradBuffer
from megatron_core.distributed.tied_embeddings import needs_embedding_sync, stage_tied_embedding_weight
from megatron_core.transformer.utils import has_tp_partial_grad


class DistributedDataParallel(torch.nn.Module):
    """Wrap a model (or pipeline stage) so that its gradients are reduced in buckets over data parallelism.

    Args:
        module: the model or pipeline stage (its parameters on their final device).
        data_parallel_group: defaults to ``parallel_state.get_data_parallel_group(with_context_parallel=True)``
            (data x context parallel, as in Megatron-Core; the same group when CP = 1).
        bucket_size: elements per bucket; overrides ``ddp_config.bucket_size``.
        ddp_config: overlap, distributed-optimizer layout, fp32 reduction (see
            :class:`DistributedDataParallelConfig`).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        data_parallel_group: dist.ProcessGroup | None = None,
        bucket_size: int | None = None,
        ddp_config: DistributedDataParallelConfig | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.ddp_config = ddp_config or DistributedDataParallelConfig()
        # Context-parallel ranks hold the same weights: gradients are averaged over data x context parallel.
        self.data_parallel_group = data_parallel_group or parallel_state.get_data_parallel_group(
            with_context_parallel=True)
        self.expert_data_parallel_group = parallel_state.get_expert_data_parallel_group()
        self.dp_size = parallel_state.group_world_size(self.data_parallel_group)
        size = bucket_size if bucket_size is not None else self.ddp_config.resolved_bucket_size(self.dp_size)
        if size < 1:
            raise ValueError(f"bucket_size={size}: must be >= 1 elements")
        self._broadcast_params()
        # Reverse registration order approximates the order in which backward produces gradients.
        self.params = [p for p in reversed(list(module.parameters())) if p.requires_grad]
        self.buffers_by_dtype = self._build_buffers(size)
        self._bucket_of = {id(p): (buf, buf.bucket_of[id(p)]) for buf in self.buffers_by_dtype for p in buf.params}
        self._sync_enabled = True
        self._restart_pending = False
        self.last_grad_sync_wait_s = 0.0
        self._used: set[int] = set()
        self._names = {id(p): n for n, p in module.named_parameters()}
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        if self.ddp_config.overlap_param_gather:
            for sub in module.modules():
                if any(True for _ in sub.parameters(recurse=False)):
                    sub.register_forward_pre_hook(self._wait_param_gather)
        # The fused output layer + cross entropy reads the output weight (tied or not) from the model's
        # forward without calling the output layer's forward, so that module's pre-hook never fires:
        # those parameters are waited for when the wrapper's forward starts.
        self._read_outside_own_forward = [
            p for name, sub in module.named_modules() if name.split(".")[-1] == "output_layer"
            for p in sub.parameters(recurse=False)]
        tied = stage_tied_embedding_weight(module)
        if tied is not None:
            self._read_outside_own_forward.append(tied)

    def _late_params(self) -> set[int]:
        late = set()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            late |= {id(p) for p in self.params if has_tp_partial_grad(p)}
        if needs_embedding_sync():
            weight = stage_tied_embedding_weight(self.module)
            if weight is not None:
                late.add(id(weight))
        return late

    def _build_buffers(self, bucket_size: int) -> list[ParamAndGradBuffer]:
        late = self._late_params()
        by_kind: dict[tuple[torch.dtype, bool], list[torch.nn.Parameter]] = {}
        for p in self.params:
            by_kind.setdefault((p.dtype, _is_expert(p)), []).append(p)
        cfg = self.ddp_config
        return [ParamAndGradBuffer(params, late, torch.float32 if cfg.grad_reduce_in_fp32 else dtype, bucket_size,
                                   self.expert_data_parallel_group if expert else self.data_parallel_group,
                                   cfg.use_distributed_optimizer, scale=1.0 / self.dp_size, expert=expert)
                for (dtype, expert), params in by_kind.items()]

    # ------------------------------------------------------------------ module plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._restart_pending and torch.is_grad_enabled():
            self.zero_grad_buffer()
        if self.ddp_config.overlap_param_gather:
            for p in self._read_outside_own_forward:
                entry = self._bucket_of.get(id(p))
                if entry is not None:
                    entry[0].finish_param_sync(entry[1])
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Model methods (set_input_tensor, sharded_state_dict, config...) stay reachable on the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's state dict (no ``module.`` prefix), as in Megatron-Core."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside only accumulate: not the step's last micro-batch, nothing is reduced yet."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _broadcast_params(self) -> None:
        for expert, group in ((False, self.data_parallel_group), (True, self.expert_data_parallel_group)):
            if group is None or parallel_state.group_world_size(group) == 1:
                continue
            src = dist.get_global_rank(group, 0)
            for p in self.module.parameters():
                if _is_expert(p) == expert:
                    dist.broadcast(p.data, src=src, group=group)

    # ------------------------------------------------------------------ gradient reduction
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        buffer, bucket = self._bucket_of[id(param)]
        if self._restart_pending:
            raise RuntimeError(
                f"gradient of {self._names.get(id(param), 'a parameter')!r} arrived after finish_grad_sync() "
                "without a forward through the DistributedDataParallel wrapper; run forwards through the "
                "wrapper or call zero_grad_buffer() before the next backward"
            )
        if bucket.grad_handle is not None or bucket.grad_reduced:
            raise RuntimeError(
                f"gradient of {self._names.get(id(param), 'a parameter')!r} arrived after its bucket "
                f"{bucket.index} was reduced: a parameter used twice in separate backward passes of the last "
                "micro-batch; set overlap_grad_reduce=False"
            )
        assert param.grad is not None
        param.main_grad.add_(param.grad)  # type: ignore[attr-defined]
        param.grad = None
        self._used.add(id(param))
        if self._sync_enabled and self.ddp_config.overlap_grad_reduce and not bucket.late:
            bucket.ready.add(id(param))
            if len(bucket.ready) == len(bucket.params):
                buffer.start_grad_sync(bucket)

    def finish_grad_sync(self, before_late_reduce: Callable[[], None] | None = None) -> None:
        """Complete this step's reductions; ``before_late_reduce`` runs the cross-group sums of late buckets.

        Called once per step after the last backward (by ``finalize_model_grads``). Gradients of
        parameters no backward reached stay ``None`` (``param.grad``), as in a single process.
        """
        start = time.perf_counter()
        for buffer in self.buffers_by_dtype:
            for bucket in buffer.buckets:
                if not bucket.late:
                    buffer.start_grad_sync(bucket)
        if before_late_reduce is not None:
            before_late_reduce()
        for buffer in self.buffers_by_dtype:
            for bucket in buffer.buckets:
                buffer.finish_grad_sync(bucket)  # launches the late ones first
        # Communication left after backward ended: what overlap_grad_reduce hides (bench/data_parallel.py).
        self.last_grad_sync_wait_s = time.perf_counter() - start
        if not self.ddp_config.use_distributed_optimizer:
            for p in self.params:
                if id(p) in self._used:
                    grad = p.main_grad  # type: ignore[attr-defined]
                    p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)
        self._restart_pending = True

    def zero_grad_buffer(self) -> None:
        """Start a new accumulation: zero the gradient buffers and drop ``param.grad``."""
        for buffer in self.buffers_by_dtype:
            buffer.reset(zero=True)
        for p in self.module.parameters():
            p.grad = None
        self._used.clear()
        self._restart_pending = False

    def used(self, param: torch.nn.Parameter) -> bool:
        """True when some backward of this step reached ``param``."""
        return id(param) in self._used

    # ------------------------------------------------------------------ parameter gather (distributed optimizer)
    def start_param_sync(self) -> None:
        """Launch the all-gathers of the updated parameter shards (bucket by bucket)."""
        for buffer in self.buffers_by_dtype:
            for bucket in buffer.buckets:
                buffer.start_param_sync(bucket)

    def finish_param_sync(self) -> None:
        """Wait until every parameter holds its updated value on every rank."""
        for buffer in self.buffers_by_dtype:
            for bucket in buffer.buckets:
                buffer.finish_param_sync(bucket)

    def _wait_param_gather(self, module: torch.nn.Module, args: Any) -> None:
        for p in module.parameters(recurse=False):
            entry = self._bucket_of.get(id(p))
            if entry is not None:
                entry[0].finish_param_sync(entry[1])


def _is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def wrap_data_parallel(module: torch.nn.Module, *, bucket_size: int | None = None,
                       ddp_config: DistributedDataParallelConfig | None = None) -> torch.nn.Module:
    """Wrap a model for data parallelism: ``module`` itself when the data-parallel size is 1 (and no
    ``ddp_config`` asks for buffers), else our bucketed :class:`DistributedDataParallel`."""
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1 and ddp_config is None:
        return module
    return DistributedDataParallel(module, None, bucket_size, ddp_config)
