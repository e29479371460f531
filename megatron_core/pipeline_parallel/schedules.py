"""Forward/backward schedules over micro-batches: no pipelining, and non-interleaved 1F1B.

(The interleaved schedule is in ``interleaved``; ``forward_backward.get_forward_backward_func``
picks one.) All take Megatron-Core's keyword-only call::

    forward_backward = get_forward_backward_func()
    losses = forward_backward(forward_step_func=step, data_iterator=it, model=model,
                              num_microbatches=8, seq_length=128, micro_batch_size=2)

``forward_step_func(data_iterator, model)`` returns ``(output_tensor, loss_func)``; on the last
stage ``loss_func(output_tensor)`` returns ``(loss, loss_dict)`` with ``loss`` the micro-batch mean,
or ``(loss_sum, num_tokens, loss_dict)``. The schedule divides by the number of micro-batches (and
tokens), so the accumulated gradient is that of the mean loss over the whole batch. The call returns
the list of per-micro-batch ``loss_dict``s on the last stage and ``[]`` elsewhere.

1F1B ("one forward, one backward"): stage ``r`` of ``p`` first runs ``p - r - 1`` warm-up forwards,
then alternates one forward with one backward, then drains the remaining backwards. At most
``p - r`` micro-batches' activations are alive at once, against ``m`` for all-forward-then-backward.
The idle time per stage is ``(p - 1)`` micro-batch slots out of ``m + p - 1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.distributed.finalize_model_grads import finalize_model_grads, unwrap_model
from megatron_core.pipeline_parallel import p2p_communication as p2p

ForwardStepFunc = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable[..., Any]]]


class ScheduleError(RuntimeError):
    """The schedule was called with arguments it cannot run."""


# ---------------------------------------------------------------------------- shared steps
def _single_model(model: torch.nn.Module | list[torch.nn.Module]) -> torch.nn.Module:
    if isinstance(model, list):
        if len(model) != 1:
            raise ScheduleError(
                f"non-interleaved schedules take one model chunk, got {len(model)}; interleaved (virtual) "
                "pipelining is not implemented: pass a single module"
            )
        return model[0]
    return model


def _model_config(model: torch.nn.Module) -> TransformerConfig:
    """The ``config`` of the (unwrapped) model: the schedule reads its width, dtype and sequence parallelism."""
    inner = unwrap_model(model)
    # Typed as the TransformerConfig fields read here; any object with them will do (tests use a toy).
    config: TransformerConfig | None = getattr(inner, "config", None)
    if config is None:
        raise ScheduleError(
            f"pipeline parallelism needs model.config (hidden_size, sequence_parallel, bf16/fp16, torch_dtype) "
            f"to know the activation shape and dtype; {type(inner).__name__} has no config: give it one"
        )
    return config


def pipeline_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the activations sent between stages: bf16/fp16 when the config says so, else params_dtype."""
    config = _model_config(model)
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return config.torch_dtype


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def get_tensor_shape(model: torch.nn.Module, seq_length: int, micro_batch_size: int) -> tuple[int, int, int]:
    """Shape of the activation passed between stages: ``[s (/ tp with sequence parallel), b, h]``."""
    config = _model_config(model)
    hidden = config.hidden_size
    if config.sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if seq_length % tp != 0:
            raise ScheduleError(
                f"seq_length={seq_length} is not divisible by tensor_model_parallel_size={tp}, which "
                "sequence parallelism needs; pad the sequence or disable sequence_parallel"
            )
        seq_length //= tp
    return (seq_length, micro_batch_size, int(hidden))


def _set_input_tensor(model: torch.nn.Module, input_tensor: torch.Tensor | None) -> None:
    setter = getattr(unwrap_model(model), "set_input_tensor", None)
    if setter is not None:
        setter(input_tensor)
    elif input_tensor is not None:
        raise ScheduleError(
            f"{type(unwrap_model(model)).__name__} has no set_input_tensor(tensor): non-first pipeline stages "
            "receive their input through it. Build the stage with pre_process=False"
        )


def forward_step(
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: torch.nn.Module,
    num_microbatches: int,
    input_tensor: torch.Tensor | None,
    forward_data_store: list[Any],
    collect_non_loss_data: bool = False,
) -> torch.Tensor:
    """Run one micro-batch forward; on the last stage turn the output into the scaled loss."""
    _set_input_tensor(model, input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    if not parallel_state.is_pipeline_last_stage():
        return output_tensor
    if collect_non_loss_data:
        forward_data_store.append(loss_func(output_tensor, non_loss_data=True))
        return output_tensor
    result = loss_func(output_tensor)
    if len(result) == 3:
        loss, num_tokens, loss_dict = result
        loss = loss / num_tokens
    elif len(result) == 2:
        loss, loss_dict = result
    else:
        raise ScheduleError(
            f"loss_func returned {len(result)} values; expected (loss, loss_dict) or (loss_sum, num_tokens, loss_dict)"
        )
    forward_data_store.append(loss_dict)
    return loss / num_microbatches


def backward_step(
    input_tensor: torch.Tensor | None,
    output_tensor: torch.Tensor,
    output_tensor_grad: torch.Tensor | None,
) -> torch.Tensor | None:
    """Backpropagate one micro-batch; return the gradient of the stage input (None on the first stage)."""
    if output_tensor_grad is None and output_tensor.numel() != 1:
        raise ScheduleError(
            f"backward of a non-scalar stage output of shape {tuple(output_tensor.shape)} needs an output "
            "gradient; only the last pipeline stage may return the loss"
        )
    torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    if input_tensor is None:
        return None
    if input_tensor.grad is None:
        raise ScheduleError(
            f"pipeline stage {parallel_state.get_pipeline_model_parallel_rank()}: the output does not depend "
            "on the input tensor given to set_input_tensor(); the stage must read its hidden states from it"
        )
    return input_tensor.grad


def _no_sync(model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    no_sync = getattr(model, "no_sync", None)
    return no_sync if callable(no_sync) else contextlib.nullcontext


def _check_counts(num_microbatches: int, seq_length: int, micro_batch_size: int) -> None:
    for name, value in (("num_microbatches", num_microbatches), ("seq_length", seq_length),
                        ("micro_batch_size", micro_batch_size)):
        if value < 1:
            raise ScheduleError(f"{name}={value}: must be >= 1")


# ---------------------------------------------------------------------------- no pipelining
def forward_backward_no_pipelining(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator[Any] | list[Iterator[Any]] | None,
    model: torch.nn.Module | list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
) -> list[Any]:
    """Run ``num_microbatches`` forward(+backward) passes on one stage, accumulating gradients.

    Data-parallel gradient reduction is held back until the last micro-batch (``model.no_sync()``),
    then finished by :func:`finalize_model_grads`. ``decoder_seq_length`` is accepted for
    Megatron-Core compatibility and unused here (nothing is communicated).

    Returns:
        The per-micro-batch loss dicts (or non-loss data with ``collect_non_loss_data``).
    """
    del decoder_seq_length
    model = _single_model(model)
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    _check_counts(num_microbatches, seq_length, micro_batch_size)
    store: list[Any] = []

    def one(_: int) -> None:
        output = forward_step(forward_step_func, data_iterator, model, num_microbatches, None, store,
                              collect_non_loss_data)
        if not forward_only:
            backward_step(None, output, None)

    with _no_sync(model)():
        for i in range(num_microbatches - 1):
            one(i)
    # The last micro-batch runs outside no_sync so that torch DDP reduces during its backward.
    one(num_microbatches - 1)
    if not forward_only:
        finalize_model_grads([model])
    return store


# ---------------------------------------------------------------------------- 1F1B
def forward_backward_pipelining_without_interleaving(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator[Any] | list[Iterator[Any]] | None,
    model: torch.nn.Module | list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
) -> list[Any]:
    """Non-interleaved 1F1B over the pipeline group (see the module docstring).

    Every rank of a pipeline group calls this with the same ``num_microbatches``, ``seq_length``
    and ``micro_batch_size``. The activation ``[seq_length, micro_batch_size, hidden_size]`` is
    checked on every output a stage produces and, through a shape header, on the first transfer
    over each link (``PipelineShapeError`` naming both shapes and both stages). ``decoder_seq_length`` (encoder-decoder models) is
    accepted for compatibility and unused.

    Returns:
        The per-micro-batch loss dicts on the last stage, ``[]`` on the others.
    """
    del decoder_seq_length
    model = _single_model(model)
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    _check_counts(num_microbatches, seq_length, micro_batch_size)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ScheduleError(
            "torch DistributedDataParallel decides at forward time which backward reduces gradients, but "
            "1F1B runs earlier micro-batches' backwards after the last forward; wrap the stage with "
            "megatron_core.distributed.DistributedDataParallel (or wrap_data_parallel) instead"
        )
    run = _OneFOneB(forward_step_func, data_iterator, model, num_microbatches,
                    get_tensor_shape(model, seq_length, micro_batch_size), forward_only, collect_non_loss_data)
    stage, stages = (parallel_state.get_pipeline_model_parallel_rank(),
                     parallel_state.get_pipeline_model_parallel_world_size())
    num_warmup = min(stages - stage - 1, num_microbatches)
    with run.grad_sync:
        run.warmup(num_warmup)
        run.steady(num_microbatches - num_warmup)
        run.cooldown(0 if forward_only else num_warmup)
    if not forward_only:
        finalize_model_grads([model])
    return run.store


class _OneFOneB:
    """The state of one 1F1B call: this stage's in-flight micro-batches and its communicator."""

    def __init__(self, forward_step_func: ForwardStepFunc, data_iterator: Any, model: torch.nn.Module,
                 num_microbatches: int, shape: tuple[int, int, int], forward_only: bool,
                 collect_non_loss_data: bool) -> None:
        self.forward_step_func, self.data_iterator, self.model = forward_step_func, data_iterator, model
        self.num_microbatches, self.shape = num_microbatches, shape
        self.forward_only, self.collect_non_loss_data = forward_only, collect_non_loss_data
        self.dtype = pipeline_dtype(model)
        self.comm = p2p.StageCommunicator(shape, self.dtype, _device(model))
        self.last = parallel_state.is_pipeline_last_stage()
        self.store: list[Any] = []
        # Inputs and outputs of micro-batches whose backward has not run yet, oldest first.
        self.inputs: list[torch.Tensor | None] = []
        self.outputs: list[torch.Tensor] = []
        # Data-parallel reduction held back until the last micro-batch's backward (whose buckets the
        # wrapper may then reduce while that backward runs).
        self.grad_sync = contextlib.ExitStack()
        self.grad_sync.enter_context(_no_sync(model)())
        self.backwards = 0

    def forward(self, input_tensor: torch.Tensor | None) -> torch.Tensor:
        output = forward_step(self.forward_step_func, self.data_iterator, self.model, self.num_microbatches,
                              input_tensor, self.store, self.collect_non_loss_data)
        if not self.last:
            p2p.check_output_shape(output, self.shape, self.dtype)
        return output

    def backward_oldest(self, output_grad: torch.Tensor | None) -> torch.Tensor | None:
        self.backwards += 1
        if self.backwards == self.num_microbatches:
            self.grad_sync.close()  # leave no_sync: this backward finishes the step's gradients
        return backward_step(self.inputs.pop(0), self.outputs.pop(0), output_grad)

    def warmup(self, count: int) -> None:
        """Forwards only: fill the pipeline with ``count`` micro-batches."""
        for _ in range(count):
            input_tensor = self.comm.recv_forward()
            output = self.forward(input_tensor)
            self.comm.send_forward(None if self.last else output)
            if not self.forward_only:
                self.inputs.append(input_tensor)
                self.outputs.append(output)

    def steady(self, count: int) -> None:
        """One forward then one backward (of the oldest in-flight micro-batch), ``count`` times."""
        input_tensor = self.comm.recv_forward() if count > 0 else None
        for i in range(count):
            last_iteration = i == count - 1
            output = self.forward(input_tensor)
            if self.forward_only:
                self.comm.send_forward(None if self.last else output)
                input_tensor = None if last_iteration else self.comm.recv_forward()
                continue
            output_grad = self.comm.send_forward_recv_backward(None if self.last else output)
            self.inputs.append(input_tensor)
            self.outputs.append(output)
            input_grad = self.backward_oldest(output_grad)
            if last_iteration:
                self.comm.send_backward(input_grad)
            else:
                input_tensor = self.comm.send_backward_recv_forward(input_grad)

    def cooldown(self, count: int) -> None:
        """Backwards only: drain the ``count`` micro-batches still in flight."""
        for _ in range(count):
            self.comm.send_backward(self.backward_oldest(self.comm.recv_backward()))
