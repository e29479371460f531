"""Point-to-point exchange of activations and their gradients between neighbouring pipeline stages.

Every message is preceded by a small header carrying the sender's shape and dtype, so a receiver
that expects another shape fails with both shapes in the message instead of hanging or reading
garbage. The header costs one extra tiny message per transfer; on the activations of a real
model that is negligible, and it is what makes a mis-configured pipeline debuggable.

Directions never mix: stage ``i`` only sends activations to ``i + 1`` and only receives their
gradients from ``i + 1``, so ordered matching per (peer, direction) is enough and no tags are
needed. All functions are no-ops on the stage that has no such neighbour (the first stage receives
no activations, the last sends none), which lets the schedules stay free of stage conditionals.
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


def _header(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _MAX_DIMS:
        raise PipelineShapeError(
            f"cannot send a {tensor.dim()}-d tensor between pipeline stages: at most {_MAX_DIMS} dims"
        )
    if tensor.dtype not in _DTYPES:
        raise PipelineShapeError(
            f"cannot send dtype {tensor.dtype} between pipeline stages; supported: {list(_DTYPES)}"
        )
    dims = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
    return torch.tensor([tensor.dim(), _DTYPES.index(tensor.dtype), *dims], dtype=torch.int64)


def _describe(stage: int, rank: int) -> str:
    return f"pipeline stage {stage} (global rank {rank})"


def _exchange(
    send: torch.Tensor | None,
    send_to: int | None,
    recv_from: int | None,
    expected_shape: Shape | None,
    dtype: torch.dtype,
    what: str,
) -> torch.Tensor | None:
    """Send ``send`` to ``send_to`` and/or receive one tensor from ``recv_from``, in two rounds.

    Round one swaps headers, round two the data; within a round every op is posted before any is
    waited on, so two neighbours sending to each other at once cannot deadlock.
    """
    group = parallel_state.get_pipeline_model_parallel_group()
    ops: list[dist.Work] = []
    recv_header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64) if recv_from is not None else None
    if send is not None and send_to is not None:
        send = send.detach().contiguous()
        ops.append(dist.isend(_header(send), dst=send_to, group=group))
    if recv_header is not None:
        ops.append(dist.irecv(recv_header, src=recv_from, group=group))
    for op in ops:
        op.wait()

    received: torch.Tensor | None = None
    ops = []
    if recv_header is not None:
        ndim, dtype_code = int(recv_header[0]), int(recv_header[1])
        shape = tuple(int(d) for d in recv_header[2:2 + ndim])
        # Receive what was actually sent, so the sender is never left blocked; check afterwards.
        received = torch.empty(shape, dtype=_DTYPES[dtype_code])
        ops.append(dist.irecv(received, src=recv_from, group=group))
    if send is not None and send_to is not None:
        ops.append(dist.isend(send, dst=send_to, group=group))
    for op in ops:
        op.wait()

    if received is not None:
        assert recv_from is not None
        _check(received, expected_shape, dtype, recv_from, what)
    return received


def _check(received: torch.Tensor, expected_shape: Shape | None, dtype: torch.dtype, peer: int, what: str) -> None:
    if expected_shape is None:
        return
    expected = tuple(int(d) for d in expected_shape)
    if tuple(received.shape) == expected and received.dtype == dtype:
        return
    ranks = parallel_state.get_pipeline_model_parallel_ranks()
    me = parallel_state.get_pipeline_model_parallel_rank()
    raise PipelineShapeError(
        f"{_describe(me, ranks[me])} expected {what} of shape {expected} ({dtype}) from "
        f"{_describe(ranks.index(peer), peer)} but received shape {tuple(received.shape)} ({received.dtype}). "
        "Stages disagree on the activation [seq_length, micro_batch_size, hidden_size]: pass the same "
        "seq_length and micro_batch_size on every rank and build every stage from the same config "
        "(hidden_size, sequence_parallel, params dtype)"
    )


def check_output_shape(output_tensor: torch.Tensor, expected_shape: Shape, dtype: torch.dtype) -> None:
    """Fail on the producing stage when its output differs from the schedule's activation shape."""
    expected = tuple(int(d) for d in expected_shape)
    if tuple(output_tensor.shape) != expected or output_tensor.dtype != dtype:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        raise PipelineShapeError(
            f"pipeline stage {stage} produced an activation of shape {tuple(output_tensor.shape)} "
            f"({output_tensor.dtype}) but the schedule sends shape {expected} ({dtype}) = "
            "[seq_length, micro_batch_size, hidden_size] to the next stage. Make the stage return "
            "[s, b, h] hidden states and pass the seq_length / micro_batch_size it was fed"
        )


def _next() -> int | None:
    if parallel_state.is_pipeline_last_stage():
        return None
    return parallel_state.get_pipeline_model_parallel_next_rank()


def _prev() -> int | None:
    if parallel_state.is_pipeline_first_stage():
        return None
    return parallel_state.get_pipeline_model_parallel_prev_rank()


def recv_forward(tensor_shape: Shape, dtype: torch.dtype) -> torch.Tensor | None:
    """Receive this stage's input activation from the previous stage (``None`` on the first stage).

    The returned tensor requires grad so that backward produces the gradient to send back.
    """
    received = _exchange(None, None, _prev(), tensor_shape, dtype, "an input activation")
    return None if received is None else received.requires_grad_()


def recv_backward(tensor_shape: Shape, dtype: torch.dtype) -> torch.Tensor | None:
    """Receive the gradient of this stage's output from the next stage (``None`` on the last stage)."""
    return _exchange(None, None, _next(), tensor_shape, dtype, "an output gradient")


def send_forward(output_tensor: torch.Tensor | None) -> None:
    """Send this stage's output activation to the next stage (no-op on the last stage)."""
    if output_tensor is not None:
        _exchange(output_tensor, _next(), None, None, output_tensor.dtype, "")


def send_backward(input_tensor_grad: torch.Tensor | None) -> None:
    """Send the gradient of this stage's input to the previous stage (no-op on the first stage)."""
    if input_tensor_grad is not None:
        _exchange(input_tensor_grad, _prev(), None, None, input_tensor_grad.dtype, "")


def send_forward_recv_backward(
    output_tensor: torch.Tensor | None, tensor_shape: Shape, dtype: torch.dtype
) -> torch.Tensor | None:
    """Send the output forward and receive its gradient from the same (next) stage, concurrently."""
    send_to = _next()
    return _exchange(output_tensor if send_to is not None else None, send_to, send_to, tensor_shape, dtype,
                     "an output gradient")


def send_backward_recv_forward(
    input_tensor_grad: torch.Tensor | None, tensor_shape: Shape, dtype: torch.dtype
) -> torch.Tensor | None:
    """Send the input gradient back and receive the next input from the same (previous) stage."""
    peer = _prev()
    received = _exchange(input_tensor_grad if peer is not None else None, peer, peer, tensor_shape, dtype,
                         "an input activation")
    return None if received is None else received.requires_grad_()
