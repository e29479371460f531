"""Data parallelism: average gradients over the data-parallel group.

Two wrappers, chosen by :func:`wrap_data_parallel`:

* **torch's ``DistributedDataParallel``** when there is no pipeline (PP = 1). It overlaps the
  all-reduce with backward and ``forward_backward_no_pipelining`` runs every micro-batch but the
  last under ``no_sync()``, which is exactly the pattern it was built for.
* **our :class:`DistributedDataParallel`** (bucketed all-reduce after the last backward) when
  PP > 1. torch's DDP decides in ``forward`` whether the *next* backward reduces, but 1F1B runs
  the backwards of up to ``p - 1`` earlier micro-batches after the last forward: the all-reduce
  would fire on the wrong backward and leave later gradient contributions unreduced. Reducing
  explicitly once every micro-batch has been accumulated has no such ordering constraint.

Both divide by the data-parallel size, so the result is the gradient of the mean loss over the
global batch (each rank's loss is already the mean over its own micro-batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state


class DistributedDataParallel(torch.nn.Module):
    """Wrap a model (or pipeline stage) so that :meth:`finish_grad_sync` averages its gradients.

    Gradients accumulate locally over micro-batches in ``param.grad``; ``finish_grad_sync`` (called
    by the schedules through ``finalize_model_grads``) flattens them into buckets of at most
    ``bucket_size`` elements, launches one asynchronous all-reduce per bucket and copies the
    averages back. Parameters start equal on every replica (broadcast from data-parallel rank 0).

    Args:
        module: the model or pipeline stage.
        data_parallel_group: defaults to ``parallel_state.get_data_parallel_group()``.
        bucket_size: elements per all-reduce bucket.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        data_parallel_group: dist.ProcessGroup | None = None,
        bucket_size: int = 40_000_000,
    ) -> None:
        super().__init__()
        if bucket_size < 1:
            raise ValueError(f"bucket_size={bucket_size}: must be >= 1 elements")
        self.module = module
        self.data_parallel_group = data_parallel_group or parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.group_world_size(self.data_parallel_group)
        # Reverse registration order approximates the order in which backward produces gradients.
        self._params = [p for p in reversed(list(module.parameters())) if p.requires_grad]
        self._buckets = _make_buckets(self._params, bucket_size)
        self._broadcast_params()

    # ------------------------------------------------------------------ module plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
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
        """Kept for API parity with torch DDP: reduction only happens in ``finish_grad_sync``."""
        yield

    # ------------------------------------------------------------------ gradient reduction
    def _broadcast_params(self) -> None:
        if self.dp_size == 1 or self.data_parallel_group is None:
            return
        src = dist.get_global_rank(self.data_parallel_group, 0)
        for p in self.module.parameters():
            dist.broadcast(p.data, src=src, group=self.data_parallel_group)

    def finish_grad_sync(self) -> None:
        """Average every parameter's gradient over the data-parallel group (blocking).

        A parameter whose gradient is ``None`` on some replicas counts as zero there; one that has
        none on every replica (unused) keeps ``grad = None`` so the optimizer skips it as it would
        in a single process.
        """
        if self.dp_size == 1:
            return
        device = self._params[0].device if self._params else torch.device("cpu")
        used = torch.tensor([p.grad is not None for p in self._params], dtype=torch.int32, device=device)
        dist.all_reduce(used, group=self.data_parallel_group)
        used = used.cpu()
        pending = []
        for bucket in self._buckets:
            flat = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket
            ]).div_(self.dp_size)
            pending.append((bucket, flat, dist.all_reduce(flat, group=self.data_parallel_group, async_op=True)))
        index = {id(p): i for i, p in enumerate(self._params)}
        for bucket, flat, work in pending:
            work.wait()
            offset = 0
            for p in bucket:
                n = p.numel()
                if used[index[id(p)]] > 0:
                    reduced = flat[offset:offset + n].view_as(p)
                    if p.grad is None:
                        p.grad = reduced.clone()
                    else:
                        p.grad.copy_(reduced)
                offset += n

    def zero_grad_buffer(self) -> None:
        """Drop accumulated gradients (Megatron-Core's name; same as ``zero_grad(set_to_none=True)``)."""
        self.module.zero_grad(set_to_none=True)


def _make_buckets(params: list[torch.nn.Parameter], bucket_size: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of same-dtype parameters holding at most ``bucket_size`` elements (or one)."""
    buckets: list[list[torch.nn.Parameter]] = []
    current: list[torch.nn.Parameter] = []
    filled = 0
    for p in params:
        if current and (filled + p.numel() > bucket_size or p.dtype != current[0].dtype):
            buckets.append(current)
            current, filled = [], 0
        current.append(p)
        filled += p.numel()
    if current:
        buckets.append(current)
    return buckets


def wrap_data_parallel(
    module: torch.nn.Module, *, bucket_size: int = 40_000_000, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """Wrap a model for data parallelism the way the current pipeline layout can use.

    Returns ``module`` itself when the data-parallel size is 1, torch's ``DistributedDataParallel``
    on the data-parallel group when PP = 1, else our bucketed :class:`DistributedDataParallel`
    (see the module docstring for why).
    """
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return module
    # Context-parallel ranks hold the same weights: their gradients are reduced with the data-parallel ones.
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return torch.nn.parallel.DistributedDataParallel(
            module, process_group=group, forward_sync_buffers=False, bucket_cap_mb=bucket_size * 4 / 2**20,
            find_unused_parameters=find_unused_parameters,
        )
    return DistributedDataParallel(module, group, bucket_size)
