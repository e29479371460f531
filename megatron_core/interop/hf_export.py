"""``export-hf``: our checkpoint (any layout) -> a Hugging Face directory ``from_pretrained`` loads.

One CPU process. The shards are planned first from shapes alone (each key-table group's transform
runs on meta tensors), then each safetensors file is written front to back: its header, then the
tensors of one group at a time, read from the checkpoint (``dist_checkpointing.load`` of that key
only), converted and written. Memory holds about one group, never the model.

The model comes from the checkpoint's description (``import-hf``, ``import-mcore``, or the Trainer's
run config; ``--config`` for a checkpoint saved by ``dist_checkpointing.save`` alone). The family is
the recorded one, else the one registered family that can represent the model.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_core import dist_checkpointing
from megatron_core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron_core.interop.description import (
    ModelDescription,
    build_model,
    describe_checkpoint,
    from_run_config,
)
from megatron_core.interop.gpt_family import GPTModelFamily
from megatron_core.interop.hf import FAMILY_MODULES, get_family
from megatron_core.interop.hf_dir import DTYPE_NAMES, file_key_table
from megatron_core.interop.keymap import KeyGroup, KeyTable
from megatron_core.interop.registry import (
    Blueprint,
    HFFamily,
    HFInteropError,
    load_family_modules,
    registered_families,
)
from megatron_core.training.checkpointing import latest_checkpoint

logger = logging.getLogger(__name__)

_SAFETENSORS_NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2, as in transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise HFInteropError(f"--max-shard-size {text!r}: expected a size such as 500MB, 2GB or 1GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _family(description: ModelDescription, blueprint: Blueprint, family: str | None) -> HFFamily:
    name = family or description.family
    if name is not None:
        return get_family(name)
    load_family_modules(FAMILY_MODULES)
    reasons: dict[str, str] = {}
    matches = []
    for model_type, candidate in sorted(registered_families().items()):
        if not isinstance(candidate, GPTModelFamily):
            continue
        try:
            reason = candidate.unsupported_reason(Blueprint(model_type, blueprint.config, blueprint.model_kwargs))
        except (HFInteropError, KeyError, ValueError) as err:
            reason = str(err)
        if reason is None:
            matches.append(candidate)
        else:
            reasons[model_type] = reason
    if len(matches) != 1:
        found = [m.model_type for m in matches] if matches else reasons
        raise HFInteropError(f"cannot tell which Hugging Face family represents this model: {found}. "
                             "Fix: pass --family MODEL_TYPE")
    return matches[0]


def _blueprint(description: ModelDescription) -> Blueprint:
    kwargs = dict(description.model_kwargs)
    if kwargs.get("position_embedding_type") == "rope":  # GPTModel's defaults, for run configs that omit them
        kwargs.setdefault("rotary_base", 10000.0)
        kwargs.setdefault("rotary_percent", 1.0)
    return Blueprint(description.family or "", description.transformer_config(), kwargs)


def _plan(table: KeyTable, shapes: dict[str, torch.Size], dtype: torch.dtype
          ) -> list[tuple[KeyGroup, list[tuple[str, tuple[int, ...]]]]]:
    """Each group with the Hugging Face (key, shape) pairs it writes (transform run on meta tensors)."""
    plan = []
    for group in table.groups:
        metas = [torch.empty(shapes[k], dtype=dtype, device="meta") for k in group.ours]
        outputs = group.inverse(metas)
        plan.append((group, [(k, tuple(t.shape)) for k, t in zip(group.hf, outputs, strict=True)]))
    return plan


def _shards(plan: Sequence[tuple[KeyGroup, list[tuple[str, tuple[int, ...]]]]], itemsize: int, limit: int
            ) -> list[list[tuple[KeyGroup, list[tuple[str, tuple[int, ...]]]]]]:
    shards: list[list[Any]] = [[]]
    size = 0
    for entry in plan:
        nbytes = sum(torch.Size(shape).numel() * itemsize for _, shape in entry[1])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _read(checkpoint: Path, leaf: ShardedTensor | ShardedTensorFactory, shape: torch.Size, dtype: torch.dtype
          ) -> torch.Tensor:
    """One whole tensor of ours from the checkpoint (TP=1 layout; any saved layout is resharded)."""
    from dataclasses import replace

    data = torch.empty(shape, dtype=dtype)
    request = replace(leaf, data=data) if isinstance(leaf, ShardedTensorFactory) else replace(leaf, data=data)
    return dist_checkpointing.load({leaf.key: request}, str(checkpoint), strict="raise_missing",
                                   allow_dtype_cast=True)[leaf.key]


def _write_safetensors(file: Path, entries: Sequence[tuple[KeyGroup, list[tuple[str, tuple[int, ...]]]]],
                       checkpoint: Path, layout: dict[str, Any], shapes: dict[str, torch.Size],
                       stored: torch.dtype, dtype: torch.dtype) -> list[str]:
    """One safetensors file, written front to back one group at a time; returns its keys."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for _, outputs in entries:
        for key, shape in outputs:
            nbytes = torch.Size(shape).numel() * itemsize
            header[key] = {"dtype": _SAFETENSORS_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for group, outputs in entries:
            tensors = [_read(checkpoint, layout[k], shapes[k], stored) for k in group.ours]
            for (key, shape), tensor in zip(outputs, group.inverse(tensors), strict=True):
                data = tensor.to(dtype).contiguous()
                assert tuple(data.shape) == shape, (key, data.shape, shape)
                f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return [k for _, outputs in entries for k, _ in outputs]


def _description(checkpoint: Path, config: str | Path | None) -> ModelDescription:
    if config is None:
        return describe_checkpoint(checkpoint)
    if not Path(config).is_file():
        raise HFInteropError(f"--config {config}: file not found")
    return from_run_config(yaml.safe_load(Path(config).read_text()))


def _latest_if_save_dir(path: Path) -> Path:
    """A Trainer's save dir (``iter_*`` checkpoints, no ``metadata.json`` of its own) -> its latest complete one."""
    if (path / "metadata.json").is_file() or not path.is_dir():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        logger.info("%s: exporting its latest checkpoint, %s", path, latest.name)
    return latest or path


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
              max_shard_size: str | int = "2GB", config: str | Path | None = None,
              family: str | None = None) -> Path:
    """Write ``config.json``, safetensors (sharded with an index when larger than ``max_shard_size``) and
    the tokenizer files the checkpoint knows, into ``out_dir``; returns it."""
    checkpoint, out = _latest_if_save_dir(Path(checkpoint_dir)), Path(out_dir)
    description = _description(checkpoint, config)
    blueprint = _blueprint(description)
    hf_family = _family(description, blueprint, family)
    blueprint.family = hf_family.model_type
    reason = hf_family.unsupported_reason(blueprint)
    if reason is not None:
        raise HFInteropError(f"{checkpoint}: {hf_family.model_type}: {reason}")
    stored = blueprint.config.torch_dtype
    out_dtype = getattr(torch, DTYPE_NAMES[dtype]) if dtype else stored
    template = None
    if description.hf_config and description.hf_config.get("model_type") == hf_family.model_type:
        import transformers

        template = transformers.AutoConfig.for_model(**description.hf_config)
    hf_config = hf_family.hf_config_from(blueprint, template)
    hf_config.dtype = str(out_dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = build_model(description.model_copy(update={"family": hf_family.model_type}))
        layout = model.sharded_state_dict()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    table = file_key_table(hf_family, blueprint)
    shards = _shards(_plan(table, shapes, out_dtype), torch.empty((), dtype=out_dtype).element_size(),
                     parse_size(max_shard_size))
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    weight_map: dict[str, str] = {}
    for i, entries in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for key in _write_safetensors(out / name, entries, checkpoint, layout, shapes, stored, out_dtype):
            weight_map[key] = name
    if len(shards) > 1:
        total = sum((out / n).stat().st_size for n in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    for name, text in description.tokenizer_files.items():
        (out / name).write_bytes(base64.b64decode(text))
    logger.info("exported %s -> %s (%s, %d file(s), %d tensors)", checkpoint, out, hf_family.model_type,
                len(shards), len(weight_map))
    return out
