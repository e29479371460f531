"""Point-to-point exchange of activations and their gradients between neighbouring pipeline stages.

A :class:`StageCommunicator` lives for one schedule call. Its first transfer in each direction is
preceded by a small header carrying the sender's shape and dtype, so a receiver that expects
another shape fails with both shapes in the message instead of hanging or reading garbage. Every
micro-batch of a call has the same shape ``[seq_length, micro_batch_size, hidden_size]`` (and the
sender checks each output against it), so later transfers skip the header: on gloo the extra
round trip per message would otherwise double the communication latency.

Directions never mix: stage ``i`` only sends activations to ``i + 1`` and only receives their
gradients from ``i + 1``, so ordered matching per peer is enough and no tags are needed. Every
method is a no-op where the neighbour does not exist (the first stage receives no activations, the
last sends none), which keeps the schedules free of stage conditionals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_core import parallel_state

_MAX_DIMS = 6
_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

Shape = Sequence[int]


class PipelineShapeError(RuntimeError):
    """Two pipeline stages disagree on the shape or dtype of the tensor passed between them."""


def _header(tensor: torch.Tensor) -> torch.Tensor:  # on the tensor's device: NCCL sends device memory only
    if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
        raise PipelineShapeError(
            f"cannot send a {tensor.dim()}-d {tensor.dtype} tensor between pipeline stages: at most "
            f"{_MAX_DIMS} dims of one of {list(_DTYPES)}"
        )
    dims = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
    return torch.tensor([tensor.dim(), _DTYPES.index(tensor.dtype), *dims], dtype=torch.int64, device=tensor.device)


def _stage_of(rank: int) -> str:
    ranks = parallel_state.get_pipeline_model_parallel_ranks()
    return f"pipeline stage {ranks.index(rank)} (global rank {rank})"


def check_output_shape(output_tensor: torch.Tensor, expected_shape: Shape, dtype: torch.dtype) -> None:
    """Fail on the producing stage when its output differs from the schedule's activation shape."""
    expected = tuple(int(d) for d in expected_shape)
    if tuple(output_tensor.shape) != expected or output_tensor.dtype != dtype:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        raise PipelineShapeError(
            f"pipeline stage {stage} produced an activation of shape {tuple(output_tensor.shape)} "
            f"({output_tensor.dtype}) but the schedule sends shape {expected} ({dtype}) = "
            "[seq_length, micro_batch_size, hidden_size] to the next stage. Make the stage return "
            "[s, b, h] hidden states and pass every rank the same seq_length / micro_batch_size"
        )


class StageCommunicator:
    """Sends and receives this stage's ``[s, b, h]`` tensors for one schedule call.

    Args:
        tensor_shape: the activation shape every stage agrees on.
        dtype: the activation dtype.
        device: where received tensors are allocated (the model's device; CUDA with NCCL).
    """

    def __init__(self, tensor_shape: Shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.shape = tuple(int(d) for d in tensor_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.group = parallel_state.get_pipeline_model_parallel_group()
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        self.prev = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
        # Peers whose first message (header) has been sent to / received from already.
        self._sent_to: set[int] = set()
        self._received_from: set[int] = set()

    # ------------------------------------------------------------------ public, Megatron-style names
    def recv_forward(self) -> torch.Tensor | None:
        """This stage's input activation from the previous stage (None on the first stage); requires grad."""
        return _requires_grad(self._exchange(None, None, self.prev, "an input activation"))

    def recv_backward(self) -> torch.Tensor | None:
        """The gradient of this stage's output from the next stage (None on the last stage)."""
        return self._exchange(None, None, self.next, "an output gradient")

    def send_forward(self, output_tensor: torch.Tensor | None) -> None:
        """Send this stage's output activation to the next stage (no-op on the last stage)."""
        self._exchange(output_tensor, self.next, None, "")

    def send_backward(self, input_tensor_grad: torch.Tensor | None) -> None:
        """Send the gradient of this stage's input to the previous stage (no-op on the first stage)."""
        self._exchange(input_tensor_grad, self.prev, None, "")

    def send_forward_recv_backward(self, output_tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Send the output forward and receive its gradient from the same (next) stage, concurrently."""
        return self._exchange(output_tensor, self.next, self.next, "an output gradient")

    def send_backward_recv_forward(self, input_tensor_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Send the input gradient back and receive the next input from the same (previous) stage."""
        return _requires_grad(self._exchange(input_tensor_grad, self.prev, self.prev, "an input activation"))

    # ------------------------------------------------------------------ transport
    def _exchange(self, send: torch.Tensor | None, send_to: int | None, recv_from: int | None,
                  what: str) -> torch.Tensor | None:
        """Send and/or receive one tensor; every op of a round is posted before any is waited on.

        Posting both directions before waiting is what lets two neighbours send to each other at
        the same moment without deadlocking.
        """
        send = send.detach().contiguous() if send is not None and send_to is not None else None
        header_out = send is not None and send_to not in self._sent_to
        header_in = recv_from is not None and recv_from not in self._received_from
        received_shape, received_dtype = self.shape, self.dtype
        if header_out or header_in:
            incoming = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
            ops: list[dist.P2POp] = []
            if header_out:
                assert send is not None
                ops.append(dist.P2POp(dist.isend, _header(send), send_to, self.group))
                self._sent_to.add(int(send_to))  # type: ignore[arg-type]
            if header_in:
                ops.append(dist.P2POp(dist.irecv, incoming, recv_from, self.group))
                self._received_from.add(int(recv_from))  # type: ignore[arg-type]
            _run(ops)
            if header_in:
                ndim = int(incoming[0])
                received_shape = tuple(int(d) for d in incoming[2:2 + ndim])
                received_dtype = _DTYPES[int(incoming[1])]

        received = (torch.empty(received_shape, dtype=received_dtype, device=self.device)
                    if recv_from is not None else None)
        ops = []
        if received is not None:
            ops.append(dist.P2POp(dist.irecv, received, recv_from, self.group))
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, send_to, self.group))
        _run(ops)
        # Checked only after the data arrived (into a buffer of the sent shape): the sender is never
        # left blocked, so the failing rank reports instead of the whole pipeline timing out.
        if received is not None and (received_shape != self.shape or received_dtype != self.dtype):
            assert recv_from is not None
            me = dist.get_rank()
            raise PipelineShapeError(
                f"{_stage_of(me)} expected {what} of shape {self.shape} ({self.dtype}) from {_stage_of(recv_from)} "
                f"but received shape {received_shape} ({received_dtype}). Stages disagree on the activation "
                "[seq_length, micro_batch_size, hidden_size]: pass the same seq_length and micro_batch_size "
                "on every rank and build every stage from the same config (hidden_size, sequence_parallel, dtype)"
            )
        return received


def _run(ops: list[dist.P2POp]) -> None:
    """Post all ops as one batch, then wait for them.

    One batch matters on NCCL: two neighbours that each send before receiving would otherwise
    queue their receive behind a send that waits for the other's receive (a deadlock).
    """
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _requires_grad(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.requires_grad_()
