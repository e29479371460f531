"""Train from a YAML file: ``python -m megatron_core.train --config CONFIG.yaml [--set key=value ...]``.

One process::

    python -m megatron_core.train --config examples/alphabet_gpt.yaml

Several (gloo on CPU, NCCL on GPU, set up from torchrun's environment); the data-parallel size is
what is left of the world after tensor x pipeline parallelism::

    torchrun --nproc_per_node 2 -m megatron_core.train --config examples/alphabet_gpt.yaml \\
        --set parallel.tensor_model_parallel_size=2
    torchrun --nproc_per_node 4 -m megatron_core.train --config examples/alphabet_gpt.yaml \\
        --set parallel.tensor_model_parallel_size=2 --set parallel.pipeline_model_parallel_size=2
    torchrun --nproc_per_node 4 -m megatron_core.train --config examples/alphabet_gpt.yaml \\
        --set parallel.pipeline_model_parallel_size=2 --set training.zero=true   # PP=2 x DP=2, ZeRO-1

``--set section.key=value`` overrides one entry of the file (the value is read as YAML).
Training resumes from the latest complete checkpoint in ``training.save_dir`` when there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_core import parallel_state
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.training.loop import Trainer, TrainResult, resolve_device
from megatron_core.training.run_config import RunConfig, build_datasets, build_model

logger = logging.getLogger("megatron_core.train")


def init_distributed(device: str = "auto") -> bool:
    """Join the process group described by torchrun's variables; True when this call created it.

    NCCL when this rank gets a GPU of its own (``device`` "auto" or "cuda" and at least one GPU per
    local rank), else gloo on CPU.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def run_training(run: RunConfig) -> TrainResult:
    """Set up parallel state, build model and data from ``run``, train; tears the parallel state down."""
    parallel_state.initialize_model_parallel(run.parallel.tensor_model_parallel_size,
                                             run.parallel.pipeline_model_parallel_size)
    try:
        # Same full weights at any TP size; each pipeline stage draws its own layers (as Megatron-LM does).
        model_parallel_manual_seed(run.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
        # With pipelining the tied embedding is synced by a collective at build time: build on the device
        # (NCCL cannot all-reduce CPU tensors).
        pipelined = run.parallel.pipeline_model_parallel_size > 1
        with torch.device(resolve_device(run.training.device)) if pipelined else contextlib.nullcontext():
            model = build_model(run)
        train_data, valid_data = build_datasets(run.data, seed=run.training.seed)
        trainer = Trainer(model, run.training, train_data, valid_data,
                          checkpoint_extra={"run_config": run.model_dump(mode="json")})
        if run.training.save_dir and _rank() == 0:
            Path(run.training.save_dir).mkdir(parents=True, exist_ok=True)
            (Path(run.training.save_dir) / "run_config.yaml").write_text(run.to_yaml())
        return trainer.train()
    finally:
        parallel_state.destroy_model_parallel()


def main(argv: Sequence[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(prog="python -m megatron_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML (see examples/alphabet_gpt.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one entry, e.g. training.train_iters=50 (repeatable)")
    args = parser.parse_args(argv)
    run = RunConfig.from_yaml(args.config, args.overrides)
    created = init_distributed(run.training.device)
    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = run_training(run)
        if _rank() == 0:
            last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
            logger.info("done: iteration %d, last loss %s, checkpoint %s", result.iteration, last, result.checkpoint)
        return result
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
