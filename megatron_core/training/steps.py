"""Forward steps: how one micro-batch becomes a loss, split where a pipeline cuts the model.

A forward step is any callable ``(model, micro_batch) -> (sum of per-token losses, token count)``.
Under pipeline parallelism the model returns its hidden states on every stage but the last, so
the step must be split in two: the stage forward (run on every stage) and the loss (run on the
last stage only, on that stage's output). :class:`StagedStep` is that split; called whole it is an
ordinary forward step, so one object serves both layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Batch = dict[str, torch.Tensor]
# (model, micro-batch) -> (sum of the per-token losses, number of tokens in that sum)
ForwardStep = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
# (model or pipeline stage, micro-batch) -> the stage's output (the loss tensor on the last stage)
StageForward = Callable[[torch.nn.Module, Batch], torch.Tensor]
# (last stage's output, micro-batch) -> (sum of the per-token losses, number of tokens in that sum)
LossReduction = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StagedStep:
    """A forward step in two parts, so that pipeline parallelism can run them on different stages.

    Args:
        forward: runs the model (or this rank's pipeline stage) on a micro-batch.
        loss: turns the last stage's output into ``(loss sum, token count)``.
    """

    forward: StageForward
    loss: LossReduction

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.forward(model, batch), batch)


def language_model_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of a language model (hidden states ``[s, b, h]`` on a non-last stage)."""
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def masked_token_loss(losses: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-token losses ``[b, s]`` where ``loss_mask`` is set, and how many tokens that is."""
    mask = batch["loss_mask"]
    return (losses.float() * mask).sum(), mask.sum()


# Masked sum of a language model's per-token loss and its token count, at any pipeline size.
language_model_step = StagedStep(language_model_forward, masked_token_loss)
