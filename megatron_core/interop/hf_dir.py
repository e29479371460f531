"""Hugging Face model directories (``config.json`` + safetensors) in: ``import_hf`` and ``load_hf_dir``.

``import_hf(HF_DIR, CKPT_DIR)`` streams: it opens every safetensors file with ``safe_open``, reads
the tensors of one key-table group (e.g. one layer's q, k and v) at a time, converts them and hands
the result to a :class:`StreamingCheckpointWriter`, so memory holds about one group (the largest
is the word embedding), never the model. The checkpoint records its model description, so it loads
at any TP/PP with no arguments (``description.load_checkpoint``). Any family in the registry
works: a family added to ``hf.FAMILY_MODULES`` needs nothing here.

``load_hf_dir(HF_DIR)`` builds our model at the current TP/PP directly from the directory: each
rank reads only its slices (``safe_open(...).get_slice``), also of the tensors that are fused or
reshaped on the way (q/k/v, gate/up, transposes: ``slice_plan``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron_core.dist_checkpointing.streaming import StreamingCheckpointWriter
from megatron_core.interop.description import DESCRIPTION_KEY, ModelDescription, build_model, describe
from megatron_core.interop.hf import FAMILY_MODULES, get_family
from megatron_core.interop.keymap import KeyGroup, KeyTable, same
from megatron_core.interop.registry import Blueprint, HFInteropError
from megatron_core.interop.slice_plan import gather, plan
from megatron_core.module import MegatronModule

logger = logging.getLogger(__name__)

#: safetensors dtype names we store weights in.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Files copied along with the weights when present (tokenizer and generation settings).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "tokenizer.model", "added_tokens.json", "generation_config.json")


class HFDirectory:
    """A Hugging Face model directory opened for tensor-by-tensor reading.

    Raises:
        HFInteropError: no config.json, an unknown model_type, a missing shard, or a tensor dtype we
            cannot store (each message names the file and the fix).
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise HFInteropError(f"{config_file} not found; pass a Hugging Face model directory "
                                 "(save_pretrained output: config.json + *.safetensors)")
        self.config_dict: dict[str, Any] = json.loads(config_file.read_text())
        model_type = self.config_dict.get("model_type")
        if model_type not in FAMILY_MODULES:
            try:
                get_family(str(model_type))
            except HFInteropError as err:
                raise HFInteropError(f"{config_file}: model_type={model_type!r} "
                                     f"(architectures {self.config_dict.get('architectures')}) has no converter; "
                                     f"supported: {sorted(FAMILY_MODULES)}. {err}") from err
        self.weight_map = self._weight_map()
        self._handles: dict[str, Any] = {}
        for name in sorted(set(self.weight_map.values())):
            file = self.path / name
            if not file.is_file():
                raise HFInteropError(f"{file}: shard listed in model.safetensors.index.json is missing; copy the "
                                     "whole model directory (every model-*.safetensors file)")
            self._handles[name] = safe_open(str(file), framework="pt", device="cpu")
        self._check_dtypes()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / "model.safetensors"
        if not single.is_file():
            found = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5"))
            hint = f" (found {found}: re-save with save_pretrained(..., safe_serialization=True))" if found else ""
            raise HFInteropError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json{hint}")
        from safetensors import safe_open

        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {key: single.name for key in f.keys()}

    def _check_dtypes(self) -> None:
        for key, name in self.weight_map.items():
            dtype = self._handles[name].get_slice(key).get_dtype()
            if dtype not in SAFETENSORS_DTYPES:
                raise HFInteropError(f"{self.path / name}: tensor {key!r} has dtype {dtype}, which we cannot store "
                                     f"(weights must be one of {sorted(SAFETENSORS_DTYPES)}); convert the model to "
                                     "float32/bfloat16/float16 first (e.g. dequantize, then save_pretrained)")

    def hf_config(self) -> Any:
        import transformers

        return transformers.AutoConfig.for_model(**self.config_dict)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the first tensor's; save_pretrained writes one)."""
        key = next(iter(self.weight_map))
        return SAFETENSORS_DTYPES[self._handles[self.weight_map[key]].get_slice(key).get_dtype()]

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self.weight_map[key]].get_tensor(key)

    def shape(self, key: str) -> torch.Size:
        """The stored shape of tensor ``key`` (from the file header, nothing read)."""
        return torch.Size(self._handles[self.weight_map[key]].get_slice(key).get_shape())

    def slice(self, key: str, box: tuple[slice, ...]) -> torch.Tensor:
        """Only the ``box`` of tensor ``key`` (``get_slice``: the rest is never read)."""
        return self._handles[self.weight_map[key]].get_slice(key)[box]

    def tokenizer_files(self) -> dict[str, str]:
        """Tokenizer/generation files present, base64 text of their bytes (plain JSON values)."""
        return {name: base64.b64encode((self.path / name).read_bytes()).decode("ascii")
                for name in TOKENIZER_FILES if (self.path / name).is_file()}


def file_key_table(family: Any, blueprint: Blueprint) -> KeyTable:
    """The key table of the files ``save_pretrained`` writes.

    The same as the in-memory one, except for families whose transformers version saves another
    layout on disk (transformers 5 writes Mixtral's experts as per-expert ``w1/w2/w3``): such a
    family defines ``file_key_table(blueprint)`` and nothing here changes.
    """
    own = getattr(family, "file_key_table", None)
    return own(blueprint) if callable(own) else family.key_table(blueprint)


def _blueprint_and_table(hf: HFDirectory, dtype: str | None) -> tuple[Blueprint, KeyTable]:
    family = get_family(hf.config_dict["model_type"])
    blueprint = family.blueprint_from_hf(hf.hf_config())
    table = file_key_table(family, blueprint)
    # A config may claim tied embeddings while the files hold a distinct head (T5 in transformers 5).
    for alias in table.aliases.values():
        if alias.hf in hf.weight_map and alias.of in hf.weight_map and \
                not torch.equal(hf.tensor(alias.hf), hf.tensor(alias.of)):
            blueprint.model_kwargs["share_embeddings_and_output_weights"] = False
            table = file_key_table(family, blueprint)
            break
    params_dtype = DTYPE_NAMES[dtype] if dtype else str(hf.dtype).removeprefix("torch.")
    blueprint.config = type(blueprint.config)(**{**blueprint.config.model_dump(), "params_dtype": params_dtype})
    return blueprint, table


def _grouped_items(hf: HFDirectory, table: KeyTable) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored tensor, read lazily, ordered so that each key-table group's members come together."""
    done: set[str] = set()
    for key in hf.weight_map:
        if key in done:
            continue
        members = [key]
        if key in table.keys("from_hf"):
            members = [k for k in table.group(key, "from_hf").hf if k in hf.weight_map]
        for member in members:
            if member not in done:
                done.add(member)
                tensor = hf.tensor(member)
                yield member, tensor
                # save_pretrained leaves tied keys out of the files: they are the tensor they are tied to.
                for alias in table.aliases.values():
                    if alias.of == member and alias.hf not in hf.weight_map and alias.hf not in done:
                        done.add(alias.hf)
                        yield alias.hf, tensor


def with_data(leaf: ShardedTensor | ShardedTensorFactory, tensor: torch.Tensor) -> Any:
    """``leaf`` (a layout leaf, e.g. built on meta) holding ``tensor``, ready for ``StreamingCheckpointWriter.add``."""
    if isinstance(leaf, ShardedTensorFactory):
        return dataclasses.replace(leaf, data=tensor)
    return dataclasses.replace(leaf, data=tensor, dtype=tensor.dtype)


def import_hf(hf_dir: str | Path, checkpoint_dir: str | Path, *, dtype: str | None = None,
              overwrite: bool = False) -> ModelDescription:
    """Convert a Hugging Face directory into our checkpoint, one key-table group at a time.

    Args:
        hf_dir: ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
        checkpoint_dir: where to write our checkpoint (loads at any TP/PP).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` to store weights in (default: as in the files).
        overwrite: replace an existing checkpoint.
    """
    hf = HFDirectory(hf_dir)
    blueprint, table = _blueprint_and_table(hf, dtype)
    description = describe(blueprint, hf_config=hf.config_dict)
    description.tokenizer_files = hf.tokenizer_files()
    target_dtype = blueprint.config.torch_dtype
    with torch.device("meta"):  # the layout of every key (TP=1), no memory
        layout = build_model(description).sharded_state_dict()
    with StreamingCheckpointWriter(checkpoint_dir, overwrite=overwrite) as writer:
        for key, tensor in table.stream(_grouped_items(hf, table), "from_hf"):
            if key not in layout:
                raise HFInteropError(f"{hf.path}: converted key {key!r} is not a key of the model; the family's key "
                                     "table and model disagree")
            writer.add({key: with_data(layout.pop(key), tensor.to(target_dtype).contiguous())})
        left = sorted(k for k in layout if not k.endswith("_extra_state"))
        if left:
            raise HFInteropError(f"{hf.path}: the files gave no tensor for {left[:8]}; the directory does not match "
                                 "its config.json")
        writer.commit({DESCRIPTION_KEY: description.model_dump(mode="json"),
                       "source": {"format": "huggingface safetensors", "path": str(hf.path)}})
    logger.info("imported %s (%s) -> %s", hf.path, blueprint.family, checkpoint_dir)
    return description


def _local_box(leaf: ShardedTensor) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(leaf.global_offset[leaf.prepend_axis_num:], leaf.local_shape,
                                                 strict=True))


def _local_positions(leaf: ShardedTensor | ShardedTensorFactory, full: Sequence[int]) -> list[torch.Tensor] | None:
    """Per dimension, the positions of the full tensor this rank holds (None: not one index per dimension)."""
    if isinstance(leaf, ShardedTensor):
        return [torch.arange(box.start, box.stop) for box in _local_box(leaf)]
    positions = []
    for dim, size in enumerate(full):  # run the factory's build/merge on positions along one dimension
        view = [1] * len(full)
        view[dim] = size
        merged = _factory_local(leaf, torch.arange(size).reshape(view).expand(*full))  # a view: no copy
        line = merged.movedim(dim, 0).reshape(merged.shape[dim], -1)
        if not bool((line == line[:, :1]).all()):
            return None
        positions.append(line[:, 0])
    return positions


def _read_local(hf: HFDirectory, group: KeyGroup, key: str,
                leaf: ShardedTensor | ShardedTensorFactory) -> torch.Tensor | None:
    """This rank's part of our ``key`` from the boxes of the group's sources it needs; None: cannot plan."""
    shapes = [hf.shape(k) for k in group.hf]
    maps = plan(group.forward, shapes, group.ours.index(key))
    if maps is None:
        return None
    full = [len(m.index) if m.index is not None else shapes[0][m.source_dim] for m in maps]
    local = _local_positions(leaf, full)
    if local is None:
        return None
    return gather(maps, local, lambda i, box: hf.slice(group.hf[i], box))


def load_hf_dir(path: str | Path, *, dtype: str | None = None) -> MegatronModule:
    """Our model at the current TP/PP holding the weights of a Hugging Face directory (eval mode).

    Each rank reads only its part of every tensor (``get_slice``), also of the tensors that are
    fused or reshaped on the way (q/k/v, gate/up, GPT-2's transposed ``Conv1D`` weights: see
    ``slice_plan``). A group whose transform cannot be planned (one stacked tensor split per expert,
    or a transform not marked as reindexing) is read whole, then sliced.
    """
    hf = HFDirectory(path)
    blueprint, table = _blueprint_and_table(hf, dtype)
    model = build_model(describe(blueprint, hf_config=hf.config_dict))
    converted: dict[str, torch.Tensor] = {}  # the other outputs of the group last read whole
    with torch.no_grad():
        for name, leaf in model.sharded_state_dict().items():
            if name.endswith("_extra_state") or not isinstance(leaf, (ShardedTensor, ShardedTensorFactory)):
                continue
            # the checkpoint key, not the state-dict name: at expert-parallel sizes > 1 a local expert's
            # name has its local index, its key the global one (the Hugging Face expert to read)
            key = leaf.key
            group = table.group(key, "to_hf")
            local: torch.Tensor | None
            if isinstance(leaf, ShardedTensor) and group.forward is same and len(group.hf) == 1:
                local = hf.slice(group.hf[0], _local_box(leaf))
            else:
                local = _read_local(hf, group, key, leaf)
            if local is None:
                logger.debug("%s: reading %s whole (transform not planned)", key, list(group.hf))
                if key not in converted:
                    outputs = group.forward([hf.tensor(k) for k in group.hf])
                    converted = dict(zip(group.ours, outputs, strict=True))
                full = converted.pop(key)
                local = full[_local_box(leaf)] if isinstance(leaf, ShardedTensor) else _factory_local(leaf, full)
            target = leaf.data  # the parameter itself
            assert target is not None, key
            target.copy_(local.to(target.dtype).reshape(target.shape))
    model.eval()
    return model


def _factory_local(leaf: ShardedTensorFactory, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a factory-stored tensor (e.g. the swiglu fc1 [gate_r; up_r]) from the whole one."""
    built = leaf.build_fn(leaf.key, leaf.data, leaf.replica_id)
    parts = built.values() if isinstance(built, dict) else built
    return leaf.merge_fn([full[_local_box(part)] for part in parts])
