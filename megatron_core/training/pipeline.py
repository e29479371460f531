"""The training loop's micro-batch path: a step's micro-batches through ``get_forward_backward_func()``.

At every pipeline size the Trainer hands its micro-batches to the schedule Megatron-Core would pick
(no pipelining at PP = 1, 1F1B at PP > 1), wrapped in our bucketed ``DistributedDataParallel``, so
gradients are finished in exactly one place: the schedule's ``finalize_model_grads`` (the
data-parallel average, the tensor-parallel partial sums, the tied-embedding sum across stages).
:class:`PipelineRunner` adapts the Trainer's conventions to the schedule:

* **Loss weighting.** The Trainer's gradient is that of (sum of per-token losses over the global
  batch) / (global token count). The schedule divides each micro-batch's loss by the number of
  micro-batches ``m`` and ``DistributedDataParallel`` averages gradients over the ``dp`` replicas,
  so each micro-batch contributes ``loss_sum / global_tokens * m * dp``: after both divisions that
  is exactly the Trainer's per-token weighting.
* **Reported loss.** Only the last stage computes it; the ``[loss sum, tokens]`` totals are summed
  over the pipeline group (other stages add zeros), so every rank, rank 0's progress bar
  included, reports the same value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.distributed import wrap_data_parallel
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.pipeline_parallel.schedules import pipeline_dtype
from megatron_core.training.steps import Batch, ForwardStep, StagedStep

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


def _whole_step_loss(output: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    del batch
    return output  # a plain forward step already returned (loss sum, token count)


def staged(step: ForwardStep) -> StagedStep:
    """``step`` split at the stage boundary; a plain step only works without pipelining.

    Raises:
        TypeError: ``step`` is a plain callable and PP > 1 (it cannot be split between stages).
    """
    if isinstance(step, StagedStep):
        return step
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise TypeError(
            f"pipeline parallelism needs the forward step split at the stage boundary, got "
            f"{getattr(step, '__name__', type(step).__name__)}; pass "
            "forward_step=StagedStep(forward=..., loss=...) (megatron_core.training.StagedStep)"
        )
    return StagedStep(step, _whole_step_loss)  # type: ignore[arg-type]


class PipelineRunner:
    """Runs micro-batches through this rank's model (or pipeline stage) with the schedule of its PP size.

    Args:
        model: this rank's model or stage (built with ``pre_process`` / ``post_process`` for its position).
        step: the forward step; split into stage forward and loss (a :class:`StagedStep`) when PP > 1.
        autocast: a context manager factory entered around every forward (bf16 autocast or a no-op).
        ddp: the data-parallel wrapper to use (default: ``wrap_data_parallel(model)``); under virtual
            pipelining the list of the chunks' wrappers (``model`` is then the first chunk), run by the
            interleaved schedule.

    Raises:
        TypeError: ``step`` is a plain callable and PP > 1.
    """

    def __init__(self, model: torch.nn.Module, step: ForwardStep, autocast: Autocast,
                 ddp: torch.nn.Module | Sequence[torch.nn.Module] | None = None) -> None:
        self.step = staged(step)
        self.autocast = autocast
        # Our bucketed DDP when DP > 1; the model itself at DP = 1; a list of chunks under virtual pipelining.
        self.stage: torch.nn.Module | list[torch.nn.Module] = (
            list(ddp) if isinstance(ddp, Sequence) else ddp if ddp is not None else wrap_data_parallel(model))
        self.dtype = pipeline_dtype(model)
        # The DDP wrapper averages over data x context parallel ranks (each CP rank holds other tokens).
        self.dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def _forward_step_func(self, stats: list[torch.Tensor], total_tokens: torch.Tensor | None,
                           num_microbatches: int) -> Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Any]]:
        scale = float(num_microbatches * self.dp_size)

        def forward_step_func(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            batch = next(data_iterator)
            with self.autocast():
                output = self.step.forward(model, batch)
            if not parallel_state.is_pipeline_last_stage():
                # Autocast may leave the hidden states in another dtype than the stages exchange.
                return output.to(self.dtype), None

            def loss_func(out: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
                with self.autocast():
                    summed, count = self.step.loss(out, batch)
                stats.append(torch.stack([summed.detach().double(), torch.as_tensor(count).double()]))
                if total_tokens is None:  # forward only: the value is not used
                    return summed, {}
                return summed / total_tokens.float() * scale, {}

            return output, loss_func

        return forward_step_func

    def run(self, micro_batches: list[Batch], total_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of ``micro_batches`` (forward only when ``total_tokens`` is None).

        Args:
            micro_batches: this data-parallel rank's micro-batches of one step, on the model's device,
                all of one shape (every stage passes the same ones).
            total_tokens: the step's token count over all data-parallel replicas (loss normaliser).

        Returns:
            ``[loss sum, token count]`` (float64) of this replica's micro-batches, on every stage.
        """
        stats: list[torch.Tensor] = []
        b, s = micro_batches[0]["tokens"].shape
        chunks: list[torch.nn.Module] | None = self.stage if isinstance(self.stage, list) else None
        get_forward_backward_func()(
            forward_step_func=self._forward_step_func(stats, total_tokens, len(micro_batches)),
            # Under virtual pipelining every chunk reads every micro-batch (only the first chunk uses the tokens).
            data_iterator=[iter(micro_batches) for _ in chunks] if chunks else iter(micro_batches), model=self.stage, num_microbatches=len(micro_batches),
            seq_length=s, micro_batch_size=b, forward_only=total_tokens is None,
        )
        first = chunks[0] if chunks is not None else self.stage
        assert isinstance(first, torch.nn.Module)
        device = next(first.parameters()).device
        totals = torch.stack(stats).sum(0).to(device) if stats else torch.zeros(2, dtype=torch.float64,
                                                                                  device=device)
        group = parallel_state.get_pipeline_model_parallel_group()
        if parallel_state.group_world_size(group) > 1:
            dist.all_reduce(totals, group=group)  # only the last stage holds losses
        return totals
