"""FP8 in the training step: the forward of every micro-batch runs inside TE's ``fp8_autocast``.

The model config is the one place FP8 is set (``fp8``, ``fp8_recipe``, ...; Megatron-Core's
fields): the Trainer reads it from the model. Only the stage forward is wrapped; the loss
reduction, the backward (TE runs it in FP8 from what the forward recorded) and the optimizer run
outside, as TE expects. Tested against the CPU stand-in of TE only (see ``extensions.te_fp8``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_fp8 import check_fp8_model, fp8_context
from megatron_core.training.pipeline import staged
from megatron_core.training.steps import Batch, ForwardStep, StagedStep, StageForward


def fp8_config(chunks: Sequence[torch.nn.Module]) -> TransformerConfig | None:
    """The model's config when it asks for FP8 (every chunk checked: TE layers, CUDA, recipe support); else None."""
    configs = [getattr(c, "config", None) for c in chunks]
    config = next((c for c in configs if isinstance(c, TransformerConfig) and c.fp8 is not None), None)
    if config is None:
        return None
    for chunk in chunks:
        check_fp8_model(chunk, config)
    return config


@dataclass(frozen=True)
class _FP8Forward:
    forward: StageForward
    config: TransformerConfig

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with fp8_context(self.config):
            return self.forward(model, batch)


def with_fp8(step: ForwardStep, config: TransformerConfig) -> StagedStep:
    """``step`` with its stage forward inside :func:`~megatron_core.extensions.te_fp8.fp8_context`."""
    split = staged(step)
    return StagedStep(_FP8Forward(split.forward, config), split.loss)
