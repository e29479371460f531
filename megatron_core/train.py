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
        --set parallel.pipeline_model_parallel_size=2 --set training.distributed_optimizer=true  # PP=2 x DP=2
    torchrun --nproc_per_node 2 -m megatron_core.train --config examples/alphabet_gpt.yaml \\
        --set parallel.pipeline_model_parallel_size=2 --set parallel.virtual_pipeline_model_parallel_size=2

``--set section.key=value`` overrides one entry of the file (the value is read as YAML).
Training resumes from the latest complete checkpoint in ``training.save_dir`` when there is one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pydantic
import pydantic_core
import torch
import torch.distributed as dist
import yaml

from megatron_core import cli, parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.data import IndexedDatasetError
from megatron_core.dist_checkpointing.errors import CheckpointingError
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.training.chunks import build_model_chunks
from megatron_core.training.loop import Trainer, TrainResult, resolve_device
from megatron_core.training.run_config import RunConfig, build_datasets, build_model, build_transformer_config
from megatron_core.transformer.spec_utils import SpecError

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
                                             run.parallel.pipeline_model_parallel_size,
                                             expert_model_parallel_size=run.parallel.expert_model_parallel_size,
                                             context_parallel_size=run.parallel.context_parallel_size,
                                             virtual_pipeline_model_parallel_size=(
                                                 run.parallel.virtual_pipeline_model_parallel_size))
    try:
        # Same full weights at any TP size; each pipeline stage draws its own layers (as Megatron-LM does).
        model_parallel_manual_seed(run.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
        # With pipelining the tied embedding is synced by a collective at build time: build on the device
        # (NCCL cannot all-reduce CPU tensors).
        pipelined = run.parallel.pipeline_model_parallel_size > 1
        with torch.device(resolve_device(run.training.device)) if pipelined else contextlib.nullcontext():
            # Under virtual pipelining one chunk per virtual pipeline rank (interleaved 1F1B).
            chunks = build_model_chunks(lambda: build_model(run))
        train_data, valid_data = build_datasets(run.data, seed=run.training.seed)
        trainer = Trainer(chunks if len(chunks) > 1 else chunks[0], run.training, train_data, valid_data,
                          checkpoint_extra={"run_config": run.model_dump(mode="json")})
        if run.training.save_dir and _rank() == 0:
            Path(run.training.save_dir).mkdir(parents=True, exist_ok=True)
            (Path(run.training.save_dir) / "run_config.yaml").write_text(run.to_yaml())
        return trainer.train()
    finally:
        parallel_state.destroy_model_parallel()


def _keys(model: type[pydantic.BaseModel]) -> str:
    return " ".join(f"{name}={field.default!r}" if field.default is not pydantic_core.PydanticUndefined
                    and field.default is not None else name for name, field in model.model_fields.items())


def config_help() -> str:
    """The ``--help`` epilog: every section of a run YAML and the keys ``--set`` accepts (with defaults)."""
    lines = ["config sections (top-level YAML keys); --set SECTION.KEY=VALUE overrides one key:"]
    sections: list[tuple[str, str]] = [
        ("transformer", "TransformerConfig fields: " + " ".join(TransformerConfig.model_fields)),
        ("spec", "dotted path of a spec function or ModuleSpec (default specs.gpt.get_gpt_layer_local_spec), "
                 "or the YAML spec form"),
        ("spec_args", "keyword arguments of the spec function"),
    ]
    for name, field in RunConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            sections.append((name, _keys(annotation)))
    for name, text in sections:
        lines.append(textwrap.fill(text, width=100, initial_indent=f"  {name + ':':<13}",
                                   subsequent_indent=" " * 15))
    return "\n".join(lines)


def _read_run_config(path: str, overrides: list[str]) -> RunConfig:
    if not Path(path).is_file():
        raise cli.UserError(f"config file {path} not found; pass --config with a run YAML "
                            "(e.g. examples/alphabet_gpt.yaml)")
    try:
        run = RunConfig.from_yaml(path, overrides)
        build_transformer_config(run)  # fail here, before any process group, on e.g. heads vs TP
        return run
    except pydantic.ValidationError as err:
        raise cli.UserError(f"{path}: {cli.format_validation_error(err)}; fix the file or the --set value") from err
    except yaml.YAMLError as err:
        raise cli.UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err


def main(argv: Sequence[str] | None = None) -> TrainResult:
    parser = cli.ArgumentParser(prog="python -m megatron_core.train", description=__doc__.splitlines()[0],
                                epilog=config_help())
    parser.add_argument("--config", required=True, help="run YAML (see examples/alphabet_gpt.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one entry, e.g. training.train_iters=50 (repeatable; keys below)")
    args = parser.parse_args(argv)
    run = _read_run_config(args.config, args.overrides)
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


#: What ``python -m megatron_core.train`` answers in one line (exit 2) instead of a traceback.
USER_ERRORS = (CheckpointingError, IndexedDatasetError, SpecError)

if __name__ == "__main__":
    cli.run(main, user_errors=USER_ERRORS)
