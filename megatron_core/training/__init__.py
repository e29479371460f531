"""A small training loop for any model of the toolkit: AdamW, warmup + cosine, clipping, checkpoints."""

from megatron_core.training.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from megatron_core.training.loop import Trainer, TrainResult, language_model_step
from megatron_core.training.optimizer import build_adamw, clip_grad_norm, finalize_grads, grad_norm_plan
from megatron_core.training.scheduler import WarmupCosineScheduler
from megatron_core.training.settings import TrainingSettings

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingSettings",
    "WarmupCosineScheduler",
    "build_adamw",
    "clip_grad_norm",
    "finalize_grads",
    "grad_norm_plan",
    "language_model_step",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
