"""The training loop: micro-batches -> loss -> backward -> clip -> AdamW -> schedule, with eval and checkpoints.

Works with any model of the toolkit whose ``forward(tokens, position_ids, attention_mask,
labels=...)`` returns a per-token loss ``[b, s]`` (every language model here); other models plug in
their own ``forward_step``. At every pipeline size the micro-batches go through
``get_forward_backward_func()`` (``training.pipeline``), which also finishes the gradients; under
pipeline parallelism (PP > 1) each rank passes its stage. The model is wrapped in our bucketed
``DistributedDataParallel`` at every size; tensor and data parallelism, overlapped gradient
reduction and the distributed optimizer (``settings.distributed_optimizer``) work at any pipeline size.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_core import dist_checkpointing, parallel_state
from megatron_core.data.loader import MicroBatchIterator
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.training.checkpointing import (
    async_save_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from megatron_core.training.chunks import ModelChunks
from megatron_core.training.compile import compile_layers
from megatron_core.training.fp8 import fp8_config, with_fp8
from megatron_core.training.moe_metrics import aux_loss_scale, moe_metrics, reset_moe_stats
from megatron_core.training.optimizer import build_adamw, clip_grad_norm, grad_norm_plan
from megatron_core.training.pipeline import PipelineRunner
from megatron_core.training.scheduler import WarmupCosineScheduler
from megatron_core.training.settings import TrainingSettings
from megatron_core.training.steps import Batch, ForwardStep, language_model_step
from megatron_core.transformer.context_parallel import get_batch_on_this_cp_rank

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: this rank's GPU when CUDA is usable (NCCL, or no process group), else the CPU.

    Under a gloo process group the collectives run on CPU tensors, so "auto" means CPU there.
    """
    if name != "auto":
        return torch.device(name)
    gloo = dist.is_available() and dist.is_initialized() and dist.get_backend() != "nccl"
    if torch.cuda.is_available() and not gloo:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_chunks(num_chunks: int, settings: TrainingSettings, evaluates: bool) -> None:
    """The chunk list matches the virtual pipeline size, and the micro-batches fill the interleaved schedule."""
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if num_chunks != (v or 1):
        raise ValueError(
            f"Trainer got {num_chunks} model chunk(s) but virtual_pipeline_model_parallel_size={v}; pass one chunk "
            "per virtual pipeline rank (megatron_core.training.build_model_chunks), or a single model without VPP"
        )
    p = parallel_state.get_pipeline_model_parallel_world_size()
    for name in ("grad_accum_steps", "eval_iters")[:2 if evaluates else 1]:  # micro-batches of a step / an evaluation
        if v is not None and p > 1 and getattr(settings, name) % p != 0:
            raise ValueError(
                f"training.{name}={getattr(settings, name)} must be a multiple of pipeline_model_parallel_size={p} "
                f"for the interleaved schedule (virtual_pipeline_model_parallel_size={v})"
            )


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _dp_sum(values: torch.Tensor) -> torch.Tensor:
    # Context-parallel ranks hold other tokens of the same samples: token counts and loss sums add up over them too.
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if parallel_state.group_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values


@dataclass
class TrainResult:
    """What a ``Trainer.train()`` call did."""

    start_iteration: int
    iteration: int
    losses: list[float] = field(default_factory=list)  # one per update run by this call
    valid_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None  # the last one saved


class Trainer:
    """Owns the optimizer, the schedule and the data position of one training run.

    Args:
        model: built on every rank (after ``parallel_state.initialize_model_parallel``); under
            pipeline parallelism this rank's stage (``pre_process`` / ``post_process`` set for it); under
            virtual pipelining (interleaved 1F1B) the list of this rank's chunks
            (:func:`~megatron_core.training.build_model_chunks`).
        settings: the loop's settings.
        train_data: map-style dataset of ``{tokens, labels, loss_mask}`` samples.
        valid_data: optional held-out dataset for periodic evaluation.
        forward_step: how a micro-batch becomes a loss (default: language models); a
            :class:`~megatron_core.training.StagedStep` when PP > 1 (a plain callable works at PP = 1).
        checkpoint_extra: JSON-able values stored in every checkpoint's common state (e.g. the run config).
    """

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module], settings: TrainingSettings,
                 train_data: torch.utils.data.Dataset, valid_data: torch.utils.data.Dataset | None = None,
                 forward_step: ForwardStep = language_model_step, checkpoint_extra: dict[str, Any] | None = None
                 ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        chunks = [c.to(self.device) for c in (model if isinstance(model, list) else [model])]
        _check_chunks(len(chunks), settings, evaluates=valid_data is not None)
        self.fp8_config = fp8_config(chunks)  # None without fp8; raises when the model cannot run FP8 here
        if settings.compile:
            for chunk in chunks:
                compile_layers(chunk, backend=settings.compile_backend)
        # One module for the optimizer, clipping and checkpoints; the schedule runs the chunks.
        self.model: torch.nn.Module = chunks[0] if len(chunks) == 1 else ModelChunks(chunks)
        self.train_data, self.valid_data = train_data, valid_data
        self.forward_step = forward_step
        self.checkpoint_extra = checkpoint_extra or {}
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=settings.overlap_grad_reduce, overlap_param_gather=settings.overlap_param_gather,
            use_distributed_optimizer=settings.distributed_optimizer, bucket_size=settings.ddp_bucket_size)
        self.ddp_chunks = [DistributedDataParallel(chunk, ddp_config=ddp_config) for chunk in chunks]
        self.optimizer = self._build_optimizer()
        self.scheduler = WarmupCosineScheduler(self.optimizer, settings.lr, settings.min_lr, settings.warmup_iters,
                                               settings.decay_iters)
        self.params, self.counted = grad_norm_plan(self.model)
        # FP8 (the model config's fp8): each micro-batch's forward inside TE's fp8_autocast.
        step = with_fp8(forward_step, self.fp8_config) if self.fp8_config is not None else forward_step
        # The schedule runs the micro-batches at every PP size (interleaved 1F1B over the chunks under VPP).
        self.pipeline = PipelineRunner(chunks[0], step, self._autocast,
                                       ddp=self.ddp_chunks[0] if len(chunks) == 1 else self.ddp_chunks)
        self.iteration = 0
        self.consumed_samples = 0
        self._pending_save: dist_checkpointing.AsyncSaveHandle | None = None
        self._resumed_from: Path | None = None  # never deleted by keep_last_n

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; with ``settings.distributed_optimizer``, sharded over the data (x context) parallel ranks."""
        s = self.settings
        betas = (s.adam_beta1, s.adam_beta2)
        if s.distributed_optimizer:  # sharded over data x context parallel ranks, where gradients reduce
            return DistributedOptimizer(self.ddp_chunks, s.lr, s.weight_decay, betas, s.adam_eps, fused=s.fused_adamw)
        return build_adamw(self.model, s.lr, s.weight_decay, betas, s.adam_eps, fused=s.fused_adamw)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, checkpoint: str | Path | None = None) -> Path | None:
        """Load ``checkpoint`` (default: the latest complete one in ``save_dir``); returns it or None."""
        path = Path(checkpoint) if checkpoint else (
            latest_checkpoint(self.settings.save_dir) if self.settings.save_dir else None)
        if path is None:
            return None
        self.wait_for_checkpoint()
        common = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self._resumed_from = path
        self.iteration = int(common["iteration"])
        self.consumed_samples = int(common.get("consumed_samples", 0))
        self._truncate_metrics()
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        return path

    def _truncate_metrics(self) -> None:
        # A run that died after its last checkpoint logged iterations that will now run again.
        path = Path(self.settings.metrics_file) if self.settings.metrics_file else None
        if path is None or not path.is_file() or not _is_rank0():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= self.iteration]
        path.write_text("".join(f"{line}\n" for line in kept))

    def save(self) -> Path:
        """Checkpoint the current iteration. With ``training.async_save`` the save continues in the
        background (training may go on at once); it is waited for before the next save, a resume and
        the end of ``train()``. Returns the checkpoint directory (committed once waited for)."""
        s = self.settings
        if not s.save_dir:
            raise ValueError("training.save_dir is not set: nowhere to save the checkpoint")
        self.wait_for_checkpoint()
        if isinstance(self.optimizer, DistributedOptimizer):
            self.optimizer.finish_param_sync()  # overlap_param_gather: the parameters must be current
        extra = {"consumed_samples": self.consumed_samples, **self.checkpoint_extra}
        if s.async_save:
            self._pending_save = async_save_checkpoint(s.save_dir, self.iteration, self.model, self.optimizer,
                                                       self.scheduler, extra_common=extra)
            return self._pending_save.path
        path = save_checkpoint(s.save_dir, self.iteration, self.model, self.optimizer, self.scheduler,
                               extra_common=extra)
        self._prune()
        return path

    def wait_for_checkpoint(self) -> None:
        """Wait for a background save (re-raising its failure), then apply ``training.keep_last_n``."""
        handle, self._pending_save = self._pending_save, None
        if handle is not None:
            handle.wait()
            self._prune()

    def _prune(self) -> None:
        # only ever after a newer checkpoint is committed; never the one this run resumed from
        if self.settings.keep_last_n is not None and self.settings.save_dir:
            prune_checkpoints(self.settings.save_dir, self.settings.keep_last_n, protect=self._resumed_from)

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16)

    @staticmethod
    def _cp_split(batch: Batch) -> Batch:
        """This context-parallel rank's chunks of every ``[b, s]`` entry (the batch itself at CP=1)."""
        if parallel_state.get_context_parallel_world_size() == 1:
            return batch
        return {k: v for k, v in get_batch_on_this_cp_rank(dict(batch)).items() if v is not None}

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """One update from ``micro_batches``; returns (mean loss per token, gradient norm)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = [self._cp_split(mb) for mb in micro_batches]
        reset_moe_stats(self.model)
        local_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches)
        # Normalise by the global token count so accumulation and data parallelism average per token.
        total_tokens = _dp_sum(torch.as_tensor(local_tokens, dtype=torch.float64, device=self.device)).clamp(min=1)
        # The schedule's finalize_model_grads has reduced over DP, TP and the tied embedding.
        with aux_loss_scale(self.model, len(micro_batches)):  # MoE: averaged like the LM loss, this step only
            loss_sum = self.pipeline.run([self._to_device(mb) for mb in micro_batches], total_tokens)[0].clone()
        if isinstance(self.optimizer, DistributedOptimizer):
            grad_norm = self.optimizer.clip_grad_norm(self.settings.clip_grad)
        else:
            grad_norm = clip_grad_norm(self.params, self.counted, self.settings.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        return float(_dp_sum(loss_sum) / total_tokens), grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-token loss over the first ``eval_iters`` micro-batches of the validation data."""
        if self.valid_data is None:
            raise ValueError("evaluate() needs valid_data")
        self.model.eval()
        batches = MicroBatchIterator(self.valid_data, self.settings.micro_batch_size, dp_rank=self.dp_rank,
                                     dp_size=self.dp_size, shuffle=False)
        totals = self.pipeline.run([self._to_device(self._cp_split(next(batches)))
                                    for _ in range(self.settings.eval_iters)])
        _dp_sum(totals)
        self.model.train()
        return float(totals[0] / totals[1].clamp(min=1))

    # ------------------------------------------------------------------ the loop
    def _due(self, interval: int) -> bool:
        return self.iteration == self.settings.train_iters or (interval > 0 and self.iteration % interval == 0)

    def _log(self, record: dict[str, Any]) -> None:
        if self.settings.metrics_file and _is_rank0():
            path = Path(self.settings.metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    @staticmethod
    def _report(bar: tqdm, message: str) -> None:
        # Printing through the bar keeps it intact; without a bar, plain logging.
        if not bar.disable:
            bar.write(message)
        elif _is_rank0():
            logger.info(message)

    def train(self) -> TrainResult:
        """Train up to ``settings.train_iters`` updates (resuming first when ``settings.resume``)."""
        s = self.settings
        if s.resume and s.save_dir:
            self.resume()
        result = TrainResult(start_iteration=self.iteration, iteration=self.iteration)
        batches = MicroBatchIterator(self.train_data, s.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                     seed=s.seed, consumed_samples=self.consumed_samples)
        # A bar only on a terminal; in CI, log files and batch jobs one plain line per log_interval steps.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=s.train_iters, initial=self.iteration,
                   disable=not (s.progress_bar and interactive and _is_rank0()),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=0.1)
        while self.iteration < s.train_iters:
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(s.grad_accum_steps)]
            lr = self.scheduler.current_lr
            loss, grad_norm = self.train_step(micro_batches)
            self.iteration += 1
            self.consumed_samples = batches.consumed_samples
            tokens = sum(mb["tokens"].numel() for mb in micro_batches) * self.dp_size
            tokens_per_s = tokens / max(time.perf_counter() - start, 1e-9)
            if s.compile and len(result.losses) == 0 and _is_rank0():
                logger.info("compile: first update took %.1f s (torch.compile of the layers included)",
                            time.perf_counter() - start)
            result.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if self.iteration % s.log_interval == 0:
                if s.progress_bar and not interactive and _is_rank0():
                    logger.info("iteration %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", self.iteration,
                                s.train_iters, loss, lr, grad_norm, tokens_per_s)
                self._log({"iteration": self.iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": tokens_per_s, **moe_metrics(self.model)})
            if self.valid_data is not None and self._due(s.eval_interval):
                valid = self.evaluate()
                result.valid_losses.append((self.iteration, valid))
                self._log({"iteration": self.iteration, "valid_loss": valid})
                self._report(bar, f"iteration {self.iteration}: validation loss {valid:.4f}")
            if s.save_dir and self._due(s.save_interval):
                result.checkpoint = self.save()
        self.wait_for_checkpoint()
        if s.async_save:
            dist_checkpointing.release_snapshot_buffers()  # the host copy kept for the next async save
        bar.close()
        result.iteration = self.iteration
        return result
