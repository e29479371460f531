"""TrainingSettings: the knobs of the training loop (the ``training:`` section of a run YAML)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class TrainingSettings(BaseModel):
    """How long, how fast and how safely to train.

    The global batch per update is ``micro_batch_size * grad_accum_steps * data-parallel size``.
    Under pipeline parallelism ``grad_accum_steps`` is the schedule's number of micro-batches: the
    pipeline idles ``(p - 1) / (grad_accum_steps + p - 1)`` of a step with ``p`` stages.
    """

    model_config = ConfigDict(extra="forbid")

    train_iters: int = 100
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 10
    lr_decay_iters: int | None = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # torch's fused AdamW kernel (~10x faster step on CPU; rounding differs from the per-tensor loop
    # by ~1e-7 per step; resume stays bit-equal). Not with distributed_optimizer (per-tensor loop there).
    fused_adamw: bool = False
    clip_grad: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    bf16: bool = False  # torch.autocast(bfloat16) around forward passes; weights stay in params_dtype
    compile: bool = False  # regional torch.compile of every TransformerLayer (training.compile.compile_layers)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": no code generation, for debugging)
    # The distributed optimizer (optimizer.DistributedOptimizer): gradients reduce-scattered, fp32 master
    # weights and AdamW moments sharded over data-parallel ranks, updated parameters all-gathered.
    distributed_optimizer: bool = False
    zero: bool = False  # deprecated alias of distributed_optimizer (the old ZeRO-1)
    overlap_grad_reduce: bool = False  # reduce each gradient bucket during backward (Megatron-Core's name)
    overlap_param_gather: bool = False  # all-gather updated parameters during the next forward (needs the above)
    ddp_bucket_size: int | None = None  # elements per gradient bucket; None: max(40M, 1M * data-parallel size)
    seed: int = 1234
    eval_interval: int = 0  # 0: evaluate only at the end (when there is validation data)
    eval_iters: int = 10
    save_interval: int = 0  # 0: save only at the end (when save_dir is set)
    save_dir: str | None = None
    resume: bool = True  # continue from the latest complete checkpoint in save_dir
    async_save: bool = False  # save in the background (dist_checkpointing.async_save); waited before the next
    keep_last_n: int | None = None  # delete older complete checkpoints once a newer one is committed
    log_interval: int = 1  # metrics line every N updates
    metrics_file: str | None = None  # JSON lines of metrics, written by rank 0
    progress_bar: bool = True
    device: str = "auto"  # "auto": cuda when available, else cpu

    @model_validator(mode="after")
    def _check(self) -> TrainingSettings:
        if self.zero:
            # ZeRO-1 on torch's ZeroRedundancyOptimizer was replaced by the distributed optimizer.
            self.distributed_optimizer = True
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ValueError("training.overlap_param_gather=true needs training.distributed_optimizer=true "
                             "(only the distributed optimizer all-gathers parameters)")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ValueError(f"training.ddp_bucket_size={self.ddp_bucket_size} must be >= 1 (elements) or null")
        for name in ("train_iters", "micro_batch_size", "grad_accum_steps", "log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name}={getattr(self, name)} must be >= 1")
        if self.keep_last_n is not None and self.keep_last_n < 1:
            raise ValueError(f"training.keep_last_n={self.keep_last_n} must be >= 1 (or unset to keep every "
                             "checkpoint)")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"training.min_lr={self.min_lr} must lie in [0, lr={self.lr}]")
        if self.warmup_iters < 0 or self.warmup_iters > self.decay_iters:
            raise ValueError(f"training.warmup_iters={self.warmup_iters} must lie in [0, lr_decay_iters="
                             f"{self.decay_iters}]; shorten the warmup or lengthen the run")
        return self

    @property
    def decay_iters(self) -> int:
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters
