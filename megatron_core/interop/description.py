"""The model description a checkpoint carries, so that it loads at any TP/PP with no arguments.

``import-hf`` and ``import-mcore`` store a :class:`ModelDescription` under
``common["model_description"]`` as plain JSON values (no pickled objects: the common state loads
with ``torch.load(weights_only=True)``). A checkpoint written by the Trainer carries its
``run_config`` instead; :func:`describe_checkpoint` reads either.

Example:
    >>> parallel_state.initialize_model_parallel(2)            # any TP/PP
    >>> model, description = load_checkpoint("ckpt/")          # built at TP=2, each rank its slices
"""

from __future__ import annotations

import base64
import contextlib
import inspect
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from megatron_core import dist_checkpointing, parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.interop.hf import get_family
from megatron_core.interop.registry import Blueprint, HFInteropError
from megatron_core.module import MegatronModule
from megatron_core.transformer.spec_utils import ModuleSpec, import_by_path, spec_from_dict
from megatron_core.transformer.transformer_block import TransformerBlockSubmodules

DESCRIPTION_KEY = "model_description"
GPT_MODEL = "megatron_core.models.gpt.GPTModel"


class ModelDescription(BaseModel):
    """Everything needed to rebuild the model of a checkpoint (plain JSON values).

    Attributes:
        family: the Hugging Face ``model_type`` when known (``"gpt2"``, ``"llama"``...), else None
            (a ``GPTModel`` from the Trainer or Megatron-Core; ``export-hf`` then infers the family).
        config: ``TransformerConfig`` fields at TP=PP=1.
        spec: dotted path of a spec function or ModuleSpec, or the YAML spec form; None: the family's.
        spec_args: keyword arguments of the spec function.
        model_kwargs: the model constructor's other arguments (vocab size, positions, tying...).
        hf_config: the source ``config.json`` (restores non-structural fields on export).
        tokenizer_files: tokenizer file name -> its bytes as base64 text (written out on export).
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    family: str | None = None
    config: dict[str, Any]
    spec: str | dict[str, Any] | None = None
    spec_args: dict[str, Any] = Field(default_factory=dict)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    hf_config: dict[str, Any] | None = None
    tokenizer_files: dict[str, str] = Field(default_factory=dict)

    def transformer_config(self, tp: int = 1, pp: int = 1) -> TransformerConfig:
        """The config at tensor/pipeline-parallel sizes ``tp``/``pp``."""
        return TransformerConfig(**{**self.config, "tensor_model_parallel_size": tp,
                                    "pipeline_model_parallel_size": pp})

    def layer_spec(self, config: TransformerConfig | None = None) -> ModuleSpec | TransformerBlockSubmodules | None:
        """The layer spec (or a block spec: one per layer); a spec function with a ``config`` argument gets ``config``."""
        if self.spec is None:
            return None
        if isinstance(self.spec, dict):
            return spec_from_dict(self.spec)
        target = import_by_path(self.spec)
        if isinstance(target, ModuleSpec):
            return target
        wants_config = "config" in inspect.signature(target).parameters
        spec = target(config=config, **self.spec_args) if wants_config else target(**self.spec_args)
        if not isinstance(spec, (ModuleSpec, TransformerBlockSubmodules)):
            raise HFInteropError(f"model description: spec {self.spec!r} gave a {type(spec).__name__}, not a ModuleSpec")
        return spec


def describe(blueprint: Blueprint, *, hf_config: dict[str, Any] | None = None,
             spec: str | None = None) -> ModelDescription:
    """The description of a blueprint (``family`` None for a plain ``GPTModel``)."""
    config = blueprint.config.model_dump(mode="json")
    config.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    return ModelDescription(family=blueprint.family or None, config=config, spec=spec,
                            model_kwargs=dict(blueprint.model_kwargs), hf_config=hf_config)


def _is_gpt(description: ModelDescription) -> bool:
    if description.family is None:
        return True
    from megatron_core.interop.gpt_family import GPTModelFamily

    return isinstance(get_family(description.family), GPTModelFamily)


def build_model(description: ModelDescription, *, device: torch.device | str | None = None) -> MegatronModule:
    """The described model at the current TP/PP (this rank's pipeline stage), randomly initialised."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    # every parallel size from the groups (expert- and context-parallel too), so a model loads at any layout
    sizes = {dim.field: dim.world_size() for dim in parallel_state.PARALLEL_DIMENSIONS}
    config = TransformerConfig(**{**description.config, **sizes})
    spec = description.layer_spec(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if _is_gpt(description):
            from megatron_core.models.gpt import GPTModel

            if spec is None:
                assert description.family is not None
                spec = get_family(description.family).layer_spec()  # type: ignore[attr-defined]
            return GPTModel(config, spec, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage(), **description.model_kwargs)
        if pp != 1:
            raise HFInteropError(f"{description.family}: only GPT-style models build at pipeline-parallel size > 1; "
                                 f"got PP={pp}. Fix: load it at pipeline_model_parallel_size=1")
        assert description.family is not None
        family = get_family(description.family)
        model = family.build_model(Blueprint(description.family, config, dict(description.model_kwargs)), spec)
        if not isinstance(model, MegatronModule):
            raise HFInteropError(f"{description.family}: built a {type(model).__name__}, not a MegatronModule")
        return model


def from_run_config(run_config: dict[str, Any]) -> ModelDescription:
    """The description of a Trainer run config (a ``RunConfig`` dict: its YAML or the checkpoint's copy)."""
    from megatron_core.training.run_config import RunConfig, build_tokenizer, build_transformer_config

    run = RunConfig.model_validate(run_config)
    run = run.model_copy(update={"parallel": run.parallel.model_copy(
        update={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1})})
    config = build_transformer_config(run).model_dump(mode="json")
    kwargs = {
        "vocab_size": build_tokenizer(run.data).vocab_size,
        "max_sequence_length": run.model.max_sequence_length or run.data.seq_length,
        "position_embedding_type": run.model.position_embedding_type,
        "share_embeddings_and_output_weights": run.model.share_embeddings_and_output_weights,
        **run.model.extra,
    }
    files = {}
    if run.data.kind != "alphabet" and run.data.tokenizer.kind == "hf" and run.data.tokenizer.path \
            and Path(run.data.tokenizer.path).is_file():
        files["tokenizer.json"] = base64.b64encode(Path(run.data.tokenizer.path).read_bytes()).decode("ascii")
    return ModelDescription(family=None, config=config, spec=run.spec, spec_args=run.spec_args, model_kwargs=kwargs,
                            tokenizer_files=files)


def describe_checkpoint(checkpoint: str | Path) -> ModelDescription:
    """The model description of a checkpoint: stored by ``import-*``, or derived from the Trainer's run config.

    Raises:
        HFInteropError: the checkpoint carries neither (name the fix: pass ``--config``).
    """
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    if DESCRIPTION_KEY in common:
        return ModelDescription.model_validate(common[DESCRIPTION_KEY])
    if "run_config" in common:
        return from_run_config(common["run_config"])
    raise HFInteropError(f"{checkpoint}: the checkpoint does not describe its model (no {DESCRIPTION_KEY} or "
                         "run_config in its common state). Fix: pass --config RUN.yaml describing the model")


def load_checkpoint(checkpoint: str | Path, description: ModelDescription | None = None
                    ) -> tuple[MegatronModule, ModelDescription]:
    """Build the checkpoint's model at the current TP/PP and load its weights (each rank its slices)."""
    description = description or describe_checkpoint(checkpoint)
    model = build_model(description)
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(sharded, str(checkpoint), strict="raise_missing")
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in sharded:
            state[key].copy_(loaded[key])
    model.eval()
    return model, description
