"""RunConfig: one YAML file describing a training run, and the builders that turn it into objects.

::

    transformer:        # TransformerConfig fields
      num_layers: 2
      hidden_size: 64
      num_attention_heads: 4
    spec: specs.gpt.get_gpt_layer_local_spec   # dotted path of a spec function or ModuleSpec,
    spec_args: {}                              # ... or the YAML spec form (a dict with `module:`)
    model:              # GPTModel arguments
      position_embedding_type: learned_absolute
    data:
      kind: alphabet    # alphabet | text (local UTF-8 files) | indexed (PREFIX.bin/.idx)
      seq_length: 32
    parallel:
      tensor_model_parallel_size: 2
      pipeline_model_parallel_size: 1
    training:           # TrainingSettings
      train_iters: 300
      distributed_optimizer: false  # true: fp32 masters + AdamW state split over data-parallel ranks
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from megatron_core import parallel_state
from megatron_core.cli import UserError
from megatron_core.config import TransformerConfig
from megatron_core.data import (
    AlphabetDataset,
    AlphabetTokenizer,
    ByteTokenizer,
    HFTokenizer,
    IndexedDataset,
    PackedSequenceDataset,
    build_from_text,
    split_train_valid,
)
from megatron_core.training.settings import TrainingSettings
from megatron_core.transformer.spec_utils import ModuleSpec, SpecError, import_by_path, spec_from_dict

logger = logging.getLogger(__name__)

Tokenizer = AlphabetTokenizer | ByteTokenizer | HFTokenizer


class ModelSection(BaseModel):
    """``GPTModel`` arguments other than the config and the spec."""

    model_config = ConfigDict(extra="forbid")

    max_sequence_length: int | None = None  # default: data.seq_length
    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "learned_absolute"
    share_embeddings_and_output_weights: bool = True
    extra: dict[str, Any] = Field(default_factory=dict)  # any other GPTModel keyword (rotary_base, ...)


class TokenizerSection(BaseModel):
    """How text becomes ids: UTF-8 bytes, or a Hugging Face ``tokenizer.json``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["byte", "hf"] = "byte"
    path: str | None = None  # kind=hf: the tokenizer.json
    eos_token: str | None = None  # kind=hf: end-of-document token (default: the usual names)

    @model_validator(mode="after")
    def _check(self) -> TokenizerSection:
        if self.kind == "hf" and not self.path:
            raise ValueError("data.tokenizer.kind=hf needs data.tokenizer.path: a tokenizer.json")
        return self


class DataSection(BaseModel):
    """Where samples come from."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["alphabet", "text", "indexed"] = "alphabet"
    seq_length: int = 32
    # alphabet: samples are generated on the fly, any count is free
    num_train_samples: int = 1_000_000
    num_valid_samples: int = 256
    min_letters: int = 2
    # text / indexed
    paths: list[str] = Field(default_factory=list)  # text files or globs (kind=text), e.g. "docs/**/*.md"
    prefix: str | None = None  # PREFIX.bin/.idx: read (indexed) or written (text; default runs/data/<stem>)
    split_paragraphs: bool = False
    valid_fraction: float = 0.05
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)  # text / indexed

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.kind == "text" and not self.paths:
            raise ValueError("data.kind=text needs data.paths: the text files to train on")
        if self.kind == "indexed" and not self.prefix:
            raise ValueError("data.kind=indexed needs data.prefix (PREFIX.bin and PREFIX.idx)")
        return self


class ParallelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1  # the sequence split over this many ranks (ring attention)
    # Model chunks per pipeline rank (interleaved 1F1B); None: one stage per rank. Not a TransformerConfig field.
    virtual_pipeline_model_parallel_size: int | None = None

    @model_validator(mode="after")
    def _check(self) -> ParallelSection:
        v = self.virtual_pipeline_model_parallel_size
        if v is not None and (v < 1 or self.pipeline_model_parallel_size < 2):
            raise ValueError(
                f"parallel.virtual_pipeline_model_parallel_size={v} needs a value >= 1 and "
                f"parallel.pipeline_model_parallel_size >= 2 (got {self.pipeline_model_parallel_size}); "
                "set it to null without pipeline parallelism"
            )
        return self


class RunConfig(BaseModel):
    """A whole training run (see the module docstring for the YAML form)."""

    model_config = ConfigDict(extra="forbid")

    transformer: dict[str, Any]
    spec: str | dict[str, Any] = "specs.gpt.get_gpt_layer_local_spec"
    spec_args: dict[str, Any] = Field(default_factory=dict)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @model_validator(mode="after")
    def _check_interleaved(self) -> RunConfig:
        # Checked here too (the Trainer checks it on every rank) so the CLI answers with one line, not a traceback.
        p, v = self.parallel.pipeline_model_parallel_size, self.parallel.virtual_pipeline_model_parallel_size
        accum = self.training.grad_accum_steps
        if v is not None and accum % p != 0:
            raise ValueError(
                f"training.grad_accum_steps={accum} must be a multiple of parallel.pipeline_model_parallel_size={p} "
                f"for the interleaved schedule (parallel.virtual_pipeline_model_parallel_size={v}); "
                f"set training.grad_accum_steps={p} (or a multiple)"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Read ``path``; each override ``"a.b.c=VALUE"`` (VALUE parsed as YAML) replaces one entry."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``data["a"]["b"]["c"]`` from ``"a.b.c=VALUE"`` (VALUE is YAML: 3, 1e-3, true, [1, 2], text)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} must look like section.key=value, e.g. training.train_iters=50")
    dotted, raw = item.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(raw)


# ----------------------------------------------------------------------------- builders
def build_transformer_config(run: RunConfig) -> TransformerConfig:
    """The ``transformer`` section with the ``parallel`` sizes filled in."""
    fields = dict(run.transformer)
    for name, value in run.parallel.model_dump(exclude={"virtual_pipeline_model_parallel_size"}).items():
        if name in fields and fields[name] != value:
            raise ValueError(f"transformer.{name}={fields[name]} disagrees with parallel.{name}={value}; "
                             "set parallel sizes in the parallel section only")
        fields[name] = value
    return TransformerConfig(**fields)


def build_spec(run: RunConfig) -> ModuleSpec:
    """The layer spec: call a spec function, take a ModuleSpec object, or read the YAML spec form."""
    if isinstance(run.spec, dict):
        return spec_from_dict(run.spec)
    target = import_by_path(run.spec)
    spec_args = dict(run.spec_args)
    experts = run.transformer.get("num_moe_experts")
    if experts is not None and callable(target) and "num_experts" in inspect.signature(target).parameters:
        # MoE from the config alone (--set transformer.num_moe_experts=8): the spec gets the MoE slot too.
        spec_args.setdefault("num_experts", experts)
        spec_args.setdefault("moe_grouped_gemm", bool(run.transformer.get("moe_grouped_gemm", False)))
    spec = target if isinstance(target, ModuleSpec) else target(**spec_args) if callable(target) else target
    if not isinstance(spec, ModuleSpec):
        raise SpecError(f"spec {run.spec!r} gave a {type(spec).__name__}, expected a ModuleSpec; point it at a "
                        "spec function such as specs.gpt.get_gpt_layer_local_spec")
    return spec


def build_tokenizer(data: DataSection) -> Tokenizer:
    if data.kind == "alphabet":
        return AlphabetTokenizer()
    if data.tokenizer.kind == "hf":
        assert data.tokenizer.path is not None
        return HFTokenizer(data.tokenizer.path, eos_token=data.tokenizer.eos_token)
    return ByteTokenizer()


def _text_prefix(data: DataSection) -> Path:
    return Path(data.prefix) if data.prefix else Path("runs/data") / Path(data.paths[0]).stem


def build_datasets(data: DataSection, seed: int = 0
                   ) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(train, valid) datasets. For ``text``, rank 0 first builds PREFIX.bin/.idx (once).

    ``valid`` is None when nothing is held out (``data.valid_fraction=0``, or a single sample).

    Raises:
        UserError: the data cannot fill one sample of ``data.seq_length`` tokens.
    """
    if data.kind == "alphabet":
        # Distinct seeds: validation sequences are drawn independently of training ones.
        return (AlphabetDataset(data.num_train_samples, data.seq_length, seed=seed, min_letters=data.min_letters),
                AlphabetDataset(data.num_valid_samples, data.seq_length, seed=seed + 1, min_letters=data.min_letters))
    prefix = Path(data.prefix or "") if data.kind == "indexed" else _text_prefix(data)
    if data.kind == "text":
        paths = expand_paths(data.paths)
        is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if is_rank0 and not _up_to_date(prefix, paths, _tokenizer_identity(data)):
            tokenizer = build_tokenizer(data)
            assert not isinstance(tokenizer, AlphabetTokenizer)
            build_from_text(paths, prefix, tokenizer=tokenizer, split_paragraphs=data.split_paragraphs)
            prefix.with_suffix(".tokenizer").write_text(_tokenizer_identity(data))
            prefix.with_suffix(".sources").write_text(_sources_identity(paths))
        if dist.is_initialized():
            dist.barrier()
    try:
        packed = PackedSequenceDataset(IndexedDataset(prefix), data.seq_length)
    except ValueError as err:  # too few tokens for one sample: the user's data, answered in one line
        raise UserError(str(err)) from err
    train, valid = split_train_valid(packed, data.valid_fraction)
    if len(valid) == 0:  # type: ignore[arg-type]
        if data.valid_fraction > 0:
            logger.warning("data.valid_fraction=%s of %d sample(s) holds none out: training without validation",
                           data.valid_fraction, len(packed))
        return train, None
    return train, valid


def expand_paths(patterns: list[str]) -> list[str]:
    """Files matching each pattern (``*``, ``**`` globs allowed), in a stable order.

    Raises:
        FileNotFoundError: a pattern matches no file.
    """
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"data.paths entry {pattern!r} matches no file (relative to {Path.cwd()})")
        files.extend(m for m in matches if m not in files)
    return files


def _tokenizer_identity(data: DataSection) -> str:
    """What tokenized ``PREFIX.bin`` (kept beside it as ``PREFIX.tokenizer``): another tokenizer rebuilds it."""
    if data.tokenizer.kind == "byte":
        return "byte"
    path = Path(data.tokenizer.path or "")
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return f"hf {path.resolve()} sha256={digest} eos={data.tokenizer.eos_token}"


def _sources_identity(paths: list[str]) -> str:
    """Which files PREFIX.bin was built from (kept beside it as ``PREFIX.sources``): another list rebuilds it."""
    return "\n".join(str(Path(p).resolve()) for p in paths)


def _up_to_date(prefix: Path, sources: list[str], tokenizer: str = "byte") -> bool:
    idx, recorded = prefix.with_suffix(".idx"), prefix.with_suffix(".tokenizer")
    same_tokenizer = (recorded.read_text() if recorded.is_file() else "byte") == tokenizer
    built_from = prefix.with_suffix(".sources")
    same_sources = built_from.is_file() and built_from.read_text() == _sources_identity(sources)
    return (same_tokenizer and same_sources and idx.is_file()
            and all(Path(s).stat().st_mtime <= idx.stat().st_mtime for s in sources))


def build_model(run: RunConfig, config: TransformerConfig | None = None, vocab_size: int | None = None) -> torch.nn.Module:
    """The ``GPTModel`` of the run on this rank: its pipeline stage (parallel state and seeds set up first)."""
    from megatron_core.models.gpt import GPTModel

    config = config or build_transformer_config(run)
    vocab_size = vocab_size or build_tokenizer(run.data).vocab_size
    return GPTModel(
        config, build_spec(run), vocab_size=vocab_size,
        max_sequence_length=run.model.max_sequence_length or run.data.seq_length,
        position_embedding_type=run.model.position_embedding_type,
        share_embeddings_and_output_weights=run.model.share_embeddings_and_output_weights,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        **run.model.extra,
    )


class NotATrainingCheckpointError(UserError, KeyError):
    """The checkpoint's common state has no ``run_config`` (not written by ``megatron_core.train``)."""


class LoadedRun(NamedTuple):
    """A trained model and where it came from."""

    model: torch.nn.Module
    run: RunConfig
    checkpoint: Path
    common: dict[str, Any]  # the checkpoint's common state (iteration, saving TP size, ...)


def model_from_checkpoint(path: str | Path) -> LoadedRun:
    """Rebuild a run's model at the *current* TP and PP sizes and load a checkpoint's weights into it.

    Args:
        path: a checkpoint directory, or a ``save_dir`` (its latest complete checkpoint is used).

    Returns:
        the model (eval mode), the run's config as saved, the checkpoint directory and its common state.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        KeyError: the checkpoint was not written by ``megatron_core.train`` (no ``run_config``).
    """
    from megatron_core import dist_checkpointing
    from megatron_core.training.checkpointing import latest_checkpoint, load_model

    path = Path(path)
    checkpoint = path if (path / "metadata.json").is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint (a directory with metadata.json) at {path} or below it")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    if "run_config" not in common:
        raise NotATrainingCheckpointError(f"{checkpoint}: no run_config in the common state; it was not saved by megatron_core.train. "
                       "Build the model yourself and use megatron_core.training.load_model")
    run = RunConfig.model_validate(common["run_config"])
    run = run.model_copy(update={"parallel": ParallelSection(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size())})
    model = build_model(run)
    load_model(checkpoint, model)
    model.eval()
    return LoadedRun(model, run, checkpoint, common)
