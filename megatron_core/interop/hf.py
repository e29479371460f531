"""Hugging Face <-> ours: ``from_hf(hf_model)`` and ``to_hf(model)``.

Both directions are exact reindexing of the same tensors (no arithmetic), so
``to_hf(from_hf(m)).state_dict()`` equals ``m.state_dict()`` bit for bit, and the logits agree to
float rounding. Dispatch is by the Hugging Face ``config.model_type``; each family lives in its own
module (``hf_gpt2.py``, ``hf_llama.py``...). To add a family, write its module and add one line to
:data:`FAMILY_MODULES`. Nothing is ever downloaded: Hugging Face models are built from configs.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128)).eval()
    >>> ours = from_hf(hf)            # megatron_core GPTModel, TP=1, same weights
    >>> back = to_hf(ours)            # GPT2LMHeadModel again
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import dtype_name
from megatron_core.interop.keymap import KeyTable
from megatron_core.interop.registry import (
    Blueprint,
    HFFamily,
    HFInteropError,
    StateDict,
    load_family_modules,
    registered_families,
)

logger = logging.getLogger(__name__)

#: Hugging Face ``model_type`` -> ``"module:FamilyClass"``; imported on first use.
FAMILY_MODULES: dict[str, str] = {
    "gpt2": "megatron_core.interop.hf_gpt2:GPT2Family",
    "llama": "megatron_core.interop.hf_llama:LlamaFamily",
    "bert": "megatron_core.interop.hf_bert:BertFamily",
    "t5": "megatron_core.interop.hf_t5:T5Family",
    "gptj": "megatron_core.interop.hf_gptj:GPTJFamily",
    "mixtral": "megatron_core.interop.hf_mixtral:MixtralFamily",
    "qwen2_moe": "megatron_core.interop.hf_qwen_moe:Qwen2MoeFamily",
    "qwen3_moe": "megatron_core.interop.hf_qwen_moe:Qwen3MoeFamily",
}

#: Attribute under which ``from_hf`` keeps the source Hugging Face config on our model, so that
#: ``to_hf`` restores its non-structural fields (token ids, names...) and knows the family.
HF_CONFIG_ATTR = "interop_hf_config"


def get_family(model_type: str) -> HFFamily:
    """The registered family for a Hugging Face ``model_type``.

    Raises:
        HFInteropError: no family handles ``model_type``; the message lists the known ones.
    """
    # Import only the family asked for: one broken or heavy family module must not block the others.
    if model_type in FAMILY_MODULES:
        load_family_modules({model_type: FAMILY_MODULES[model_type]})
    families = registered_families()
    if model_type not in families:
        known = sorted(set(families) | set(FAMILY_MODULES))
        raise HFInteropError(
            f"no Hugging Face converter for model_type={model_type!r}; known: {known}. "
            "Fix: add a family module under megatron_core/interop and list it in FAMILY_MODULES."
        )
    return families[model_type]


def _check_tp_one(what: str) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != 1:
        raise HFInteropError(
            f"{what} works on whole (TP=1) models, but the tensor-parallel world size is {tp}. "
            "Fix: convert in a single process, then reshard with dist_checkpointing."
        )


def _apply_overrides(config: TransformerConfig, overrides: Mapping[str, Any] | None) -> TransformerConfig:
    if not overrides:
        return config
    if overrides.get("tensor_model_parallel_size", 1) != 1 or overrides.get("pipeline_model_parallel_size", 1) != 1:
        raise HFInteropError(
            "config_overrides: from_hf builds a TP=1, PP=1 model; got "
            f"tensor_model_parallel_size={overrides.get('tensor_model_parallel_size', 1)}, "
            f"pipeline_model_parallel_size={overrides.get('pipeline_model_parallel_size', 1)}. "
            "Fix: convert at TP=1 and reshard the saved checkpoint."
        )
    return TransformerConfig(**{**config.model_dump(), **overrides})


def blueprint_from_hf_config(hf_config: Any) -> Blueprint:
    """Our config and model arguments for a Hugging Face config (no model built)."""
    return get_family(hf_config.model_type).blueprint_from_hf(hf_config)


def key_table_from_hf_config(hf_config: Any) -> tuple[Blueprint, KeyTable]:
    """The blueprint and the key table of a Hugging Face config, to convert tensors without models.

    The config alone decides tying (``tie_word_embeddings``); a checkpoint whose head is tied
    otherwise shows up as a missing or unexpected ``lm_head`` key when it is converted.
    """
    family = get_family(hf_config.model_type)
    blueprint = family.blueprint_from_hf(hf_config)
    return blueprint, family.key_table(blueprint)


def state_dict_from_hf(hf_state_dict: Mapping[str, torch.Tensor], hf_config: Any) -> tuple[Blueprint, StateDict]:
    """Convert a Hugging Face state dict to ours without building either model.

    Returns:
        The blueprint (config + model arguments) and the state dict with our names and layouts.
    """
    blueprint, table = key_table_from_hf_config(hf_config)
    return blueprint, table.from_hf(hf_state_dict)


def _load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise HFInteropError(f"{what}: converted state dict does not fit the model: {err}") from err


def from_hf(
    hf_model: torch.nn.Module,
    *,
    spec: Any | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build our model (TP=1) holding the same weights as a Hugging Face model.

    Args:
        hf_model: a supported ``transformers`` model (``GPT2LMHeadModel``, ``LlamaForCausalLM``...).
        spec: layer spec to build with (default: the family's local spec); any spec with the same
            checkpoint keys works, e.g. the TE spec.
        config_overrides: TransformerConfig fields to change that do not alter the weights
            (dropout, recompute, ``bf16``...).

    Returns:
        Our model in the same train/eval mode, in the Hugging Face model's dtype.

    Raises:
        HFInteropError: unknown family or model class, a config we cannot represent
            (UnsupportedHFConfigError), or weights that do not match the config.
    """
    _check_tp_one("from_hf")
    hf_config: Any = hf_model.config
    family = get_family(hf_config.model_type)
    if type(hf_model).__name__ not in family.hf_model_classes:
        raise HFInteropError(
            f"from_hf converts {family.hf_model_classes} for model_type={family.model_type!r}, got "
            f"{type(hf_model).__name__}. Fix: build one of those classes (they hold the output heads)."
        )
    blueprint = family.blueprint_from_hf_model(hf_model)
    dtype = dtype_name(next(hf_model.parameters()).dtype, family.model_type)
    blueprint.config = _apply_overrides(blueprint.config, {"params_dtype": dtype, **(config_overrides or {})})
    state_dict = family.state_dict_from_hf(hf_model.state_dict(), blueprint)
    model = family.build_model(blueprint, spec)
    _load(model, state_dict, f"from_hf({family.model_type})")
    model.train(hf_model.training)
    setattr(model, HF_CONFIG_ATTR, copy.deepcopy(hf_config))
    return model


def _family_for(model: torch.nn.Module, model_type: str | None) -> HFFamily:
    template = getattr(model, HF_CONFIG_ATTR, None)
    if model_type is None and template is not None:
        model_type = template.model_type
    if model_type is not None:
        return get_family(model_type)
    load_family_modules(FAMILY_MODULES)
    matches, reasons = [], {}
    for name, family in registered_families().items():
        try:
            reason = family.unsupported_reason(family.blueprint_of(model))
        except HFInteropError as err:
            reason = str(err)
        if reason is None:
            matches.append(family)
        else:
            reasons[name] = reason
    if len(matches) != 1:
        found = [f.model_type for f in matches] if matches else reasons
        raise HFInteropError(
            f"to_hf: cannot infer the Hugging Face family of this {type(model).__name__}: {found}. "
            "Fix: pass model_type=... naming a family that can represent it."
        )
    return matches[0]


def to_hf(
    model: torch.nn.Module, *, model_type: str | None = None, attn_implementation: str | None = None
) -> torch.nn.Module:
    """Build the ``transformers`` model holding the same weights as our (TP=1) model.

    Args:
        model: our model, e.g. a ``GPTModel`` from ``from_hf`` or built from a spec.
        model_type: Hugging Face family (``"gpt2"``, ``"llama"``...); default: the one ``from_hf``
            recorded, else the single registered family that can represent the model.
        attn_implementation: ``"eager"``, ``"sdpa"``... (default: transformers' choice).

    Raises:
        HFInteropError: the model is tensor-parallel, or the family cannot represent its config.
    """
    _check_tp_one("to_hf")
    family = _family_for(model, model_type)
    blueprint = family.blueprint_of(model)
    if blueprint.config.tensor_model_parallel_size != 1:
        raise HFInteropError(
            f"to_hf: model has tensor_model_parallel_size={blueprint.config.tensor_model_parallel_size}; "
            "Fix: save it with dist_checkpointing and load it into a TP=1 model first."
        )
    reason = family.unsupported_reason(blueprint)
    if reason is not None:
        raise HFInteropError(f"to_hf({family.model_type}): {reason}")
    template = getattr(model, HF_CONFIG_ATTR, None)
    if template is not None and template.model_type != family.model_type:
        template = None
    hf_config = family.hf_config_from(blueprint, template)
    kwargs: dict[str, Any] = {"dtype": blueprint.config.torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    hf_model = family.build_hf_model(hf_config, **kwargs)
    family.prepare_hf_model(hf_model, blueprint)
    state_dict = family.state_dict_to_hf(model.state_dict(), blueprint)
    _load(hf_model, state_dict, f"to_hf({family.model_type})")
    hf_model.train(model.training)
    return hf_model
