"""``import-mcore``: a Megatron-Core ``torch_dist`` checkpoint -> our checkpoint, on CPU, without Megatron-Core.

Megatron-Core saves a GPT's weights as global (TP=1) tensors with three differences from our
state-dict names, undone here:

1. layers are stacked: ``decoder.layers.<rest>`` has a leading ``num_layers`` axis whose slice ``i``
   is ``decoder.layers.<i>.<rest>``;
2. norms are saved under Transformer Engine's fused names (``linear_qkv.layer_norm_weight`` is
   ``input_layernorm.weight``, ``linear_fc1.layer_norm_weight`` is ``pre_mlp_layernorm.weight``);
3. ``_extra_state`` entries (Transformer Engine's FP8 metadata) carry no weights and are skipped.

The model description comes from Megatron-LM's stored ``args`` when the common state holds them,
else from a run YAML (``--config``, the Trainer's format: ``transformer``, ``spec``, ``model``); the
vocabulary size and learned-position length come from the stored tensors.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing.mapping import ShardedTensor
from megatron_core.dist_checkpointing.streaming import StreamingCheckpointWriter
from megatron_core.interop.description import DESCRIPTION_KEY, ModelDescription, build_model
from megatron_core.interop.hf_dir import with_data
from megatron_core.interop.mcore_args import description_from_args
from megatron_core.interop.torch_dist import TorchDistCheckpoint, TorchDistError, load_archive

logger = logging.getLogger(__name__)

#: ``decoder.layers.<rest>`` (layer-stacked: leading layer axis) or ``decoder.layers.<i>.<rest>`` (one layer).
_LAYER = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A Megatron-LM save dir (``latest_checkpointed_iteration.txt``) -> its latest iteration directory."""
    path = Path(path)
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        return path / sub
    return path


#: Megatron-Core's expert keys (after the layer axis): all experts in one key with an expert axis (SequentialMLP
#: and TEGroupedMLP alike), or one key per expert when saved with ``singleton_local_shards`` (either naming).
_EXPERTS = re.compile(r"^mlp\.experts\.experts\.(linear_fc[12]\.(?:weight|bias))$")
_ONE_EXPERT = re.compile(r"^mlp\.experts\.experts\.(?:(\d+)\.(linear_fc[12]\.(?:weight|bias))|"
                         r"(linear_fc[12]\.(?:weight|bias))(\d+))$")


def our_names(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Our names for one stored key of ``shape``, each with its index into the stored tensor (() = all of it).

    A layer-stacked key gives one name per layer (index ``(layer,)``); its experts key one per layer
    and expert (index ``(layer, expert)``: Megatron-Core puts the expert axis after the layer axis).
    Layers of different kinds (dense and MoE) are stored one key per layer, ``decoder.layers.<i>.<rest>``,
    with the same names inside (an experts key then has the expert axis first).
    """
    match = _LAYER.match(key)
    if match is None:
        return [(key, ())]
    rest = TE_NORM_NAMES.get(match.group(2), match.group(2))
    stacked = match.group(1) is None
    layers = range(shape[0]) if stacked else [int(match.group(1))]
    lead = (lambda i: (i,)) if stacked else (lambda i: ())
    experts = _EXPERTS.match(rest)
    if experts is not None:
        return [(f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{experts.group(1)}", (*lead(i), e))
                for i in layers for e in range(shape[len(lead(0))])]
    one = _ONE_EXPERT.match(rest)
    if one is not None:
        expert, name = (one.group(1), one.group(2)) if one.group(1) is not None else (one.group(4), one.group(3))
        rest = f"mlp.experts.local_experts.{int(expert)}.{name}"
    return [(f"decoder.layers.{i}.{rest}", lead(i)) for i in layers]


def read_common_state(ckpt: TorchDistCheckpoint) -> dict[str, Any]:
    """Megatron-Core's common state: the ``common_state`` byte object (0.19) or an older ``common.pt``."""
    keys = [k for k in ckpt.byte_keys if k.startswith("common_state/")]
    # Megatron-LM's args hold enums of Megatron-Core (read as stand-ins) and signal.Signals (an enum: safe)
    admit = {"safe_globals": (argparse.Namespace, signal.Signals), "stub_modules": ("megatron.",)}
    try:
        if keys:
            state = ckpt.object(keys[0], **admit)  # type: ignore[arg-type]
        elif (ckpt.path / "common.pt").is_file():
            state = load_archive((ckpt.path / "common.pt").read_bytes(), **admit)  # type: ignore[arg-type]
        else:
            return {}
    except Exception as err:  # weights_only refused a class: we run no code from the checkpoint
        logger.warning("%s: common state not readable without unpickling code (%s); ignoring it", ckpt.path, err)
        return {}
    if isinstance(state, list) and len(state) == 1:
        state = state[0]
    return state if isinstance(state, dict) else {}


def description_from_run_yaml(path: str | Path, ckpt: TorchDistCheckpoint) -> ModelDescription:
    """A description from a run YAML (Trainer format); vocab and learned-position sizes from the stored tensors."""
    from megatron_core.training.run_config import RunConfig, build_transformer_config

    run = RunConfig.from_yaml(path)
    run = run.model_copy(update={"parallel": run.parallel.model_copy(
        update={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1})})
    kwargs: dict[str, Any] = {
        "vocab_size": ckpt.shape("embedding.word_embeddings.weight")[0],
        "max_sequence_length": run.model.max_sequence_length or run.data.seq_length,
        "position_embedding_type": run.model.position_embedding_type,
        "share_embeddings_and_output_weights": run.model.share_embeddings_and_output_weights,
        **run.model.extra,
    }
    if "embedding.position_embeddings.weight" in ckpt.tensor_keys:
        kwargs["max_sequence_length"] = ckpt.shape("embedding.position_embeddings.weight")[0]
    return ModelDescription(config=build_transformer_config(run).model_dump(mode="json"), spec=run.spec,
                            spec_args=run.spec_args, model_kwargs=kwargs)


def _describe(ckpt: TorchDistCheckpoint, common: dict[str, Any], config: str | Path | None) -> ModelDescription:
    if config is not None:
        return description_from_run_yaml(config, ckpt)
    args = common.get("args")
    if args is not None:
        return description_from_args(vars(args) if isinstance(args, argparse.Namespace) else dict(args),
                                     ckpt.shape("embedding.word_embeddings.weight")[0])
    raise TorchDistError(f"{ckpt.path}: the checkpoint stores no Megatron-LM args describing the model (saved by "
                         "Megatron-Core directly). Fix: pass --config RUN.yaml with its transformer/spec/model "
                         "sections (see examples/alphabet_gpt.yaml)")


def _full_shape(leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, ShardedTensor):
        return tuple(leaf.global_shape[leaf.prepend_axis_num:])
    return tuple(leaf.data.shape)  # a factory at TP=1 holds the whole tensor


def _plan(ckpt: TorchDistCheckpoint, layout: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(stored key, index into it, our key) for every stored tensor; every problem found from shapes alone."""
    plan: list[tuple[str, tuple[int, ...], str]] = []
    unmapped: list[str] = []
    wrong: list[str] = []
    for key in ckpt.tensor_keys:
        shape = ckpt.shape(key)
        for ours, index in our_names(key, shape):
            if ours not in layout:
                unmapped.append(f"{key} -> {ours}")
                continue
            stored = shape[len(index):]
            if stored != _full_shape(layout[ours]):
                wrong.append(f"{ours}: stored {stored}, model {_full_shape(layout[ours])}")
            plan.append((key, index, ours))
    missing = sorted(set(layout) - {ours for _, _, ours in plan})
    if unmapped or missing:
        raise TorchDistError(f"{ckpt.path}: cannot map the checkpoint onto the described model: "
                             f"{len(unmapped)} stored key(s) with no place {unmapped[:12]}, {len(missing)} model key(s) "
                             f"not stored {missing[:12]}. Fix: check --config (layers, biases, tying, spec)")
    if wrong:
        raise TorchDistError(f"{ckpt.path}: shapes disagree with the description: {wrong[:8]}. Fix: check --config")
    return plan


def import_mcore(source: str | Path, target: str | Path, *, config: str | Path | None = None,
                 overwrite: bool = False) -> ModelDescription:
    """Convert the ``torch_dist`` checkpoint ``source`` into our checkpoint ``target`` (TP=1, loads at any TP/PP).

    Streams: one stored tensor (one layer of a layer-stacked key) is read, converted and written at a
    time, so memory holds about the largest layer tensor, never the model.

    Raises:
        TorchDistError: unreadable checkpoint, no description, keys we cannot map (listed), or shapes that
            disagree with the description.
    """
    ckpt = TorchDistCheckpoint(resolve_checkpoint_dir(source))
    description = _describe(ckpt, read_common_state(ckpt), config)
    with torch.device("meta"):  # every key's layout (TP=1), no memory
        layout = {k: v for k, v in build_model(description).sharded_state_dict().items()
                  if not k.endswith("_extra_state")}
    plan = _plan(ckpt, layout)
    dtype = description.transformer_config().torch_dtype
    with StreamingCheckpointWriter(target, overwrite=overwrite) as writer:
        for key, index, ours in plan:
            tensor = ckpt.tensor(key, tuple(slice(i, i + 1) for i in index))[(0,) * len(index)]
            writer.add({ours: with_data(layout[ours], tensor.to(dtype).contiguous())})
        writer.commit({DESCRIPTION_KEY: description.model_dump(mode="json"),
                       "source": {"format": "megatron-core torch_dist", "path": str(ckpt.path)}})
    logger.info("imported %s -> %s (%d tensors, streamed)", ckpt.path, target, len(plan))
    return description
