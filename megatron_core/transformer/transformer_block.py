"""TransformerBlock: this pipeline stage's layers, the final norm, and activation recompute.

Each stage builds only its own layers. Layer ``i`` of the stage is global layer
``offset + i`` (``layer_number = offset + i + 1``); the module list is ``layers`` so state-dict
keys are ``layers.<i>`` (local), while checkpoint keys use the global index ``layers.<offset+i>``,
which lets a checkpoint saved with one pipeline split load into another.

Under sequence parallelism the activations between layers are ``[s/tp, b, h]``; every layer works
on them as they are (the parallel linears gather and scatter the sequence dimension).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict
from megatron_core.module import MegatronModule, default_sharded_state_dict
from megatron_core.tensor_parallel import random as tp_random
from megatron_core.transformer.norms import WrappedNorm
from megatron_core.transformer.spec_utils import ModuleSpec, build_module, resolve_module
from megatron_core.transformer.transformer_layer import TransformerLayer
from megatron_core.transformer.utils import replace_prefix_for_sharding


@dataclass
class TransformerBlockSubmodules:
    """One spec per layer of this stage, and the final norm's spec."""

    layer_specs: list[ModuleSpec] = field(default_factory=list)
    layer_norm: ModuleSpec | type | None = None


def _stage_layer_counts(config: TransformerConfig) -> list[int]:
    """Layers on each pipeline stage: first/last overrides, the rest split evenly."""
    pp = config.pipeline_model_parallel_size
    if pp == 1:
        return [config.num_layers]
    first, last = config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = config.num_layers - (first or 0) - (last or 0)
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _pipeline_rank(config: TransformerConfig) -> int:
    parallel_state.check_config_parallel_sizes(config)  # the stage split assumes the config's PP size
    return parallel_state.get_pipeline_model_parallel_rank()


def _layers_per_virtual_chunk(config: TransformerConfig) -> int | None:
    """Layers per model chunk under virtual pipelining (interleaved 1F1B), None without it."""
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if v is None:
        return None
    chunks = config.pipeline_model_parallel_size * v
    if config.num_layers % chunks or config.num_layers_in_first_pipeline_stage is not None \
            or config.num_layers_in_last_pipeline_stage is not None:
        raise ValueError(
            f"num_layers={config.num_layers} must split evenly into pipeline_model_parallel_size="
            f"{config.pipeline_model_parallel_size} x virtual_pipeline_model_parallel_size={v} chunks, without "
            "num_layers_in_first/last_pipeline_stage; change num_layers or the virtual pipeline size"
        )
    return config.num_layers // chunks


def get_num_layers_to_build(config: TransformerConfig) -> int:
    """How many layers this pipeline stage (or, interleaved, this model chunk) holds."""
    per_chunk = _layers_per_virtual_chunk(config)
    if per_chunk is not None:
        return per_chunk
    return _stage_layer_counts(config)[_pipeline_rank(config)]


def get_transformer_layer_offset(config: TransformerConfig) -> int:
    """Global index of this stage's (or model chunk's) first layer.

    Interleaved, chunk ``c`` of pipeline rank ``r`` is piece ``c * p + r`` of the stack.
    """
    per_chunk = _layers_per_virtual_chunk(config)
    if per_chunk is not None:
        chunk = parallel_state.get_virtual_pipeline_model_parallel_rank()
        return (chunk * config.pipeline_model_parallel_size + _pipeline_rank(config)) * per_chunk
    return sum(_stage_layer_counts(config)[:_pipeline_rank(config)])


def _sharded_state_dict_of(
    module: torch.nn.Module, prefix: str, sharded_offsets: tuple[RankOffset, ...], metadata: dict[str, Any] | None
) -> ShardedStateDict:
    """A module's own sharding if it declares one, else the default (replicated over TP)."""
    method = getattr(module, "sharded_state_dict", None)
    if method is not None:
        return method(prefix, sharded_offsets, metadata)
    return default_sharded_state_dict(module, prefix, sharded_offsets, metadata)


def _block_submodules(config: TransformerConfig, spec: Any) -> TransformerBlockSubmodules:
    if isinstance(spec, TransformerBlockSubmodules):
        return spec
    if isinstance(spec, ModuleSpec):
        module = resolve_module(spec.module)
        if isinstance(module, type) and issubclass(module, TransformerBlock):
            return spec.submodules
        return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=WrappedNorm)
    raise TypeError(
        f"TransformerBlock spec must be a layer ModuleSpec, a TransformerBlock ModuleSpec or "
        f"TransformerBlockSubmodules; got {type(spec).__name__}"
    )


class TransformerBlock(MegatronModule):
    """The stack of transformer layers of this pipeline stage, plus the final norm on the last stage.

    Args:
        config: the TransformerConfig.
        spec: a layer ``ModuleSpec`` (repeated for every layer of the stage) or
            ``TransformerBlockSubmodules`` (one spec per local layer, and the final norm).
        post_layer_norm: build the final norm (on the last stage).
        pre_process: this stage takes the embeddings (else ``set_input_tensor`` feeds it).
        post_process: this stage is the last one.
    """

    def __init__(
        self, config: TransformerConfig, spec: Any, post_layer_norm: bool = True, pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(config)
        self.submodules = _block_submodules(config, spec)
        self.pre_process = pre_process
        self.post_process = post_process
        self.post_layer_norm = post_layer_norm
        self.input_tensor: torch.Tensor | None = None
        self.layer_offset = get_transformer_layer_offset(config)
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=self.layer_offset + i + 1)
            for i, layer_spec in enumerate(self.submodules.layer_specs)
        )
        self.final_layernorm: torch.nn.Module | None = None
        if post_process and post_layer_norm and self.submodules.layer_norm is not None:
            self.final_layernorm = build_module(
                self.submodules.layer_norm, config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """The activations received from the previous pipeline stage (``[s(/tp), b, h]``)."""
        self.input_tensor = input_tensor

    def recompute_plan(self) -> list[tuple[int, int, bool]]:
        """This stage's layers as ``(start, end, recomputed)`` runs, from the config's recompute settings.

        ``full`` + ``uniform``: chunks of ``recompute_num_layers`` layers, each checkpointed as one
        (only its input is kept). ``full`` + ``block``: the first ``recompute_num_layers`` layers
        of the stage are checkpointed one by one, the rest run normally. Otherwise (no recompute,
        or ``selective``, which acts inside attention) every layer runs normally.
        """
        n = len(self.layers)
        count = self.config.recompute_num_layers
        if self.config.recompute_granularity != "full" or count is None:
            return [(i, i + 1, False) for i in range(n)]
        if self.config.recompute_method == "uniform":
            return [(i, min(i + count, n), True) for i in range(0, n, count)]
        return [(i, i + 1, i < count) for i in range(n)]

    def _run_layers(self, start: int, end: int, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        context = kwargs.get("context")
        for layer in self.layers[start:end]:
            hidden_states, context = layer(hidden_states, **{**kwargs, "context": context})
        return hidden_states

    def _checkpointed(self, start: int, end: int, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        tensor_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in kwargs.items() if k not in tensor_names}

        def run(hidden: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            return self._run_layers(start, end, hidden, {**others, **dict(zip(tensor_names, tensors, strict=True))})

        return tp_random.checkpoint(run, False, hidden_states, *[kwargs[k] for k in tensor_names])

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rotary_pos_emb: Any = None,
        inference_params: Any = None,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[s, b, h]`` (or ``[s/tp, b, h]`` with sequence parallelism) through this stage's layers."""
        if not self.pre_process:
            hidden_states = self.input_tensor
        if hidden_states is None:
            raise ValueError(
                "TransformerBlock got no input: pass hidden_states on the first stage, or call "
                "set_input_tensor() on later pipeline stages"
            )
        kwargs: dict[str, Any] = dict(
            attention_mask=attention_mask, context=context, context_mask=context_mask,
            rotary_pos_emb=rotary_pos_emb, inference_params=inference_params, attention_bias=attention_bias,
        )
        recompute_allowed = self.training and inference_params is None and torch.is_grad_enabled()
        for start, end, recomputed in self.recompute_plan():
            if recomputed and recompute_allowed:
                hidden_states = self._checkpointed(start, end, hidden_states, kwargs)
            else:
                hidden_states = self._run_layers(start, end, hidden_states, kwargs)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        """Layers under their *global* index in the checkpoint keys (dict keys stay local)."""
        out: ShardedStateDict = {}
        for i, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{i}."
            layer_sd = _sharded_state_dict_of(layer, local_prefix, sharded_offsets, metadata)
            global_index = layer.layer_number - 1 if isinstance(layer, TransformerLayer) else self.layer_offset + i
            replace_prefix_for_sharding(layer_sd, local_prefix, f"{prefix}layers.{global_index}.")
            out.update(layer_sd)
        for name, child in self.named_children():
            if name == "layers":
                continue
            out.update(_sharded_state_dict_of(child, f"{prefix}{name}.", sharded_offsets, metadata))
        return out
