"""Interleaved 1F1B (virtual pipeline): each pipeline rank holds ``v`` model chunks.

With ``p`` ranks and ``v`` chunks per rank the layer stack is cut into ``p * v`` chunks; chunk
``c`` of rank ``r`` is piece ``c * p + r``, so a micro-batch goes round the ring of ranks ``v``
times. Each rank works on "virtual micro-batches" ``k = 0 .. m * v - 1``: forward ``k`` runs chunk
``(k // p) % v`` on micro-batch ``(k // (p * v)) * p + k % p``; backward ``k`` runs the chunks in
reverse order (``v - 1 - (k // p) % v``). Rank ``r`` first runs ``2 * (p - r - 1) + (v - 1) * p``
warm-up forwards, then alternates one forward with one backward, then drains the backwards (as in
Megatron-Core). A stage's idle share falls from ``(p - 1) / (m + p - 1)`` to about
``(p - 1) / (v * m + p - 1)`` at the price of ``v`` times more point-to-point messages.

Transfers: activations and gradients travel with tags of their own, sends are asynchronous (waited
for at the end) and receives block only when the data is needed; a rank's sends and its
neighbour's receives of one kind happen in the same order, so messages match. The first transfer
on each link carries a shape header (as in the non-interleaved schedule) and every produced
activation is checked against ``[seq_length, micro_batch_size, hidden_size]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.distributed.finalize_model_grads import finalize_model_grads
from megatron_core.pipeline_parallel import p2p_communication as p2p
from megatron_core.pipeline_parallel.schedules import (
    ForwardStepFunc,
    ScheduleError,
    _check_counts,
    _device,
    _no_sync,
    backward_step,
    forward_step,
    get_tensor_shape,
    pipeline_dtype,
)

_ACTIVATION, _GRADIENT = 0, 1  # message tags


class _Ring:
    """Point-to-point transfers round the pipeline ring (rank p - 1 feeds rank 0's next chunk)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.next = parallel_state.get_pipeline_model_parallel_next_rank()
        self.prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.pending: list[Any] = []
        self._headed: set[tuple[str, int, int]] = set()

    def send(self, tensor: torch.Tensor, to: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        if ("send", to, tag) not in self._headed:
            self._headed.add(("send", to, tag))
            self.pending.append(dist.isend(p2p._header(tensor), to, group=self.group, tag=tag))
        self.pending.append(dist.isend(tensor, to, group=self.group, tag=tag))

    def recv(self, src: int, tag: int) -> torch.Tensor:
        if ("recv", src, tag) not in self._headed:
            self._headed.add(("recv", src, tag))
            header = torch.zeros(2 + p2p._MAX_DIMS, dtype=torch.int64, device=self.device)
            dist.recv(header, src, group=self.group, tag=tag)
            shape = tuple(int(d) for d in header[2:2 + int(header[0])])
            dtype = p2p._DTYPES[int(header[1])]
            if shape != self.shape or dtype != self.dtype:
                raise p2p.PipelineShapeError(
                    f"{p2p._stage_of(dist.get_rank())} expected a tensor of shape {self.shape} ({self.dtype}) from "
                    f"{p2p._stage_of(src)} but it sends shape {shape} ({dtype}); pass the same seq_length and "
                    "micro_batch_size on every rank and build every chunk from the same config"
                )
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.recv(out, src, group=self.group, tag=tag)
        return out

    def finish(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()


def forward_backward_pipelining_with_interleaving(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator[Any] | list[Iterator[Any]] | None,
    model: list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
) -> list[Any]:
    """Interleaved 1F1B over the model chunks of this rank (see the module docstring).

    ``model`` is the list of this rank's chunks (chunk ``c`` built with the virtual pipeline rank
    set to ``c``); ``data_iterator`` one iterator per chunk (each chunk reads every micro-batch).

    Returns:
        The per-micro-batch loss dicts on the last stage, ``[]`` on the others.
    """
    del decoder_seq_length
    if not isinstance(model, list) or not isinstance(data_iterator, list) or len(data_iterator) != len(model):
        raise ScheduleError(
            "the interleaved schedule takes model=[chunk, ...] and data_iterator=[iterator, ...], one per chunk "
            f"(virtual_pipeline_model_parallel_size={parallel_state.get_virtual_pipeline_model_parallel_world_size()})"
        )
    _check_counts(num_microbatches, seq_length, micro_batch_size)
    p, v = parallel_state.get_pipeline_model_parallel_world_size(), len(model)
    if v != parallel_state.get_virtual_pipeline_model_parallel_world_size():
        raise ScheduleError(f"{v} model chunks but virtual_pipeline_model_parallel_size="
                            f"{parallel_state.get_virtual_pipeline_model_parallel_world_size()}; build one per chunk")
    if num_microbatches % p != 0:
        raise ScheduleError(f"num_microbatches={num_microbatches} must be a multiple of the pipeline size {p} "
                            "for the interleaved schedule")
    run = _Interleaved(forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
                       forward_only, collect_non_loss_data)
    try:
        run.run()
    finally:
        run.ring.finish()
        for stack in run.grad_sync:
            stack.close()
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    if not forward_only:
        finalize_model_grads(model)
    return run.store


class _Interleaved:
    """The state of one interleaved call: in-flight tensors per chunk, the ring, grad-sync gates."""

    def __init__(self, forward_step_func: ForwardStepFunc, data_iterator: list[Any], model: list[torch.nn.Module],
                 num_microbatches: int, seq_length: int, micro_batch_size: int, forward_only: bool,
                 collect_non_loss_data: bool) -> None:
        self.forward_step_func, self.data_iterator, self.model = forward_step_func, data_iterator, model
        self.m, self.v = num_microbatches, len(model)
        self.p = parallel_state.get_pipeline_model_parallel_world_size()
        self.rank = parallel_state.get_pipeline_model_parallel_rank()
        self.forward_only, self.collect_non_loss_data = forward_only, collect_non_loss_data
        self.shape = get_tensor_shape(model[0], seq_length, micro_batch_size)
        self.dtype = pipeline_dtype(model[0])
        self.ring = _Ring(self.shape, self.dtype, _device(model[0]))
        self.store: list[Any] = []
        self.inputs: list[list[torch.Tensor | None]] = [[] for _ in model]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in model]
        self.backwards = [0] * self.v
        # Each chunk reduces its gradients on its own last backward only.
        self.grad_sync = [contextlib.ExitStack() for _ in model]
        for stack, chunk in zip(self.grad_sync, model, strict=True):
            stack.enter_context(_no_sync(chunk)())

    def _chunk(self, k: int, forward: bool) -> int:
        c = (k // self.p) % self.v
        return c if forward else self.v - 1 - c

    def _first(self, c: int) -> bool:
        return self.rank == 0 and c == 0

    def _last(self, c: int) -> bool:
        return self.rank == self.p - 1 and c == self.v - 1

    def forward(self, k: int) -> None:
        c = self._chunk(k, forward=True)
        parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        input_tensor = None if self._first(c) else self.ring.recv(self.ring.prev, _ACTIVATION).requires_grad_()
        output = forward_step(self.forward_step_func, self.data_iterator[c], self.model[c], self.m, input_tensor,
                              self.store, self.collect_non_loss_data)
        if not self._last(c):
            p2p.check_output_shape(output, self.shape, self.dtype)
            self.ring.send(output, self.ring.next, _ACTIVATION)
        if not self.forward_only:
            self.inputs[c].append(input_tensor)
            self.outputs[c].append(output)

    def backward(self, k: int) -> None:
        c = self._chunk(k, forward=False)
        parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        output_grad = None if self._last(c) else self.ring.recv(self.ring.next, _GRADIENT)
        self.backwards[c] += 1
        if self.backwards[c] == self.m:
            self.grad_sync[c].close()  # this chunk's last backward: its buckets may reduce now
        input_grad = backward_step(self.inputs[c].pop(0), self.outputs[c].pop(0), output_grad)
        if not self._first(c):
            assert input_grad is not None
            self.ring.send(input_grad, self.ring.prev, _GRADIENT)

    def run(self) -> None:
        total = self.m * self.v
        if self.forward_only:
            for k in range(total):
                self.forward(k)
            return
        warmup = total if self.m == self.p else min(total, 2 * (self.p - self.rank - 1) + (self.v - 1) * self.p)
        for k in range(warmup):
            self.forward(k)
        for k in range(total - warmup):
            self.forward(k + warmup)
            self.backward(k)
        for k in range(total - warmup, total):
            self.backward(k)
