"""A small training loop for any model of the toolkit: AdamW (or the distributed optimizer), warmup + cosine, clipping, checkpoints,
at any tensor x pipeline (also interleaved) x data x context parallel layout."""

from megatron_core.training.checkpointing import (
    async_save_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
)
from megatron_core.training.chunks import ModelChunks, build_model_chunks
from megatron_core.training.loop import Trainer, TrainResult
from megatron_core.training.optimizer import build_adamw, clip_grad_norm, grad_norm_plan
from megatron_core.training.scheduler import WarmupCosineScheduler
from megatron_core.training.settings import TrainingSettings
from megatron_core.training.steps import (
    StagedStep,
    language_model_forward,
    language_model_step,
    masked_token_loss,
)

__all__ = [
    "ModelChunks",
    "StagedStep",
    "TrainResult",
    "Trainer",
    "TrainingSettings",
    "WarmupCosineScheduler",
    "async_save_checkpoint",
    "build_adamw",
    "build_model_chunks",
    "clip_grad_norm",
    "grad_norm_plan",
    "language_model_forward",
    "language_model_step",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "masked_token_loss",
    "prune_checkpoints",
    "save_checkpoint",
]
