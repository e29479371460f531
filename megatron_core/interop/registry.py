"""The Hugging Face family registry: one :class:`HFFamily` per ``model_type``.

A family knows three things about one Hugging Face architecture: how its config maps to a
:class:`Blueprint` of ours (our ``TransformerConfig`` plus the model constructor's arguments) and
back, how its state dict maps to ours and back, and how to build both models. ``hf.py`` only
dispatches on ``config.model_type``; adding a family is one new module and one line in
``hf.FAMILY_MODULES`` (or a call to :func:`register_family` from user code).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.errors import HFInteropError, StateDict, UnsupportedHFConfigError
from megatron_core.interop.keymap import KeyTable

__all__ = [
    "Blueprint",
    "HFFamily",
    "HFInteropError",
    "StateDict",
    "UnsupportedHFConfigError",
    "drop_token_ids_outside_vocab",
    "load_family_modules",
    "register_family",
    "registered_families",
]

@dataclass
class Blueprint:
    """Everything needed to rebuild one of our models.

    Attributes:
        family: the Hugging Face ``model_type`` this blueprint converts to and from.
        config: our transformer config (TP=1).
        model_kwargs: the model constructor's other arguments (vocab size, positions, tying...).
    """

    family: str
    config: TransformerConfig
    model_kwargs: dict[str, Any] = field(default_factory=dict)


class HFFamily(ABC):
    """Converter between one Hugging Face architecture and one of our model classes."""

    #: Hugging Face ``config.model_type`` handled by this family, e.g. ``"gpt2"``.
    model_type: ClassVar[str]
    #: Hugging Face model classes ``from_hf`` accepts (class names, no import needed to check).
    hf_model_classes: ClassVar[tuple[str, ...]]

    # ---- configs
    @abstractmethod
    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        """Map a Hugging Face config to ours; raise UnsupportedHFConfigError for what we cannot represent."""

    @abstractmethod
    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        """Map our blueprint to a Hugging Face config; ``template`` supplies non-structural fields."""

    @abstractmethod
    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        """Why ``blueprint`` cannot become this family's Hugging Face model, or None when it can."""

    def blueprint_from_hf_model(self, hf_model: Any) -> Blueprint:
        """Blueprint of a built Hugging Face model: by default, of its config.

        Families override it where the config does not say everything about the weights (e.g.
        whether the output head is tied: in transformers 5 T5's config always says tied).
        """
        return self.blueprint_from_hf(hf_model.config)

    # ---- models
    @abstractmethod
    def build_model(self, blueprint: Blueprint, spec: Any | None = None) -> torch.nn.Module:
        """Our model, randomly initialised, from a blueprint (and a layer spec, else the family's)."""

    @abstractmethod
    def blueprint_of(self, model: torch.nn.Module) -> Blueprint:
        """Read the blueprint back from one of our models."""

    def build_hf_model(self, hf_config: Any, **kwargs: Any) -> torch.nn.Module:
        """The Hugging Face model for ``hf_config`` (random weights, nothing downloaded).

        By default the family's first class in ``hf_model_classes``; ``kwargs`` go to
        ``PreTrainedModel._from_config`` (``dtype``, ``attn_implementation``).
        """
        import transformers

        return getattr(transformers, self.hf_model_classes[0])._from_config(hf_config, **kwargs)

    def prepare_hf_model(self, hf_model: Any, blueprint: Blueprint) -> None:
        """Adjust a freshly built Hugging Face model to ``blueprint`` before its weights load.

        The default does nothing; a family overrides it for structure its config cannot express
        (e.g. untying T5's head, which transformers 5 always ties).
        """
        del hf_model, blueprint

    # ---- state dicts
    @abstractmethod
    def key_table(self, blueprint: Blueprint) -> KeyTable:
        """The family's state-dict mapping for ``blueprint``: one rule list read in both directions."""

    def state_dict_from_hf(self, hf_state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        """Hugging Face state dict -> ours (Megatron-Core names and layouts), from :meth:`key_table`."""
        return self.key_table(blueprint).from_hf(hf_state_dict)

    def state_dict_to_hf(self, state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        """Our state dict -> Hugging Face names and layouts, from :meth:`key_table`."""
        return self.key_table(blueprint).to_hf(state_dict)


_REGISTRY: dict[str, HFFamily] = {}


def register_family(family: HFFamily) -> HFFamily:
    """Register ``family`` under its ``model_type`` (replacing any earlier one) and return it."""
    _REGISTRY[family.model_type] = family
    return family


def load_family_modules(modules: Mapping[str, str]) -> None:
    """Import ``"module:Class"`` entries whose model_type is not registered yet and register them."""
    for model_type, target in modules.items():
        if model_type in _REGISTRY:
            continue
        module_name, _, class_name = target.partition(":")
        family_cls = getattr(importlib.import_module(module_name), class_name)
        register_family(family_cls())


def registered_families() -> dict[str, HFFamily]:
    """The registered families by ``model_type`` (a copy)."""
    return dict(_REGISTRY)


# GPT2Config's and GPTJConfig's default bos/eos token id (GPT-2's <|endoftext|>).
GPT2_DEFAULT_TOKEN_ID = 50256


def drop_token_ids_outside_vocab(
    config_fields: dict[str, Any],
    vocab_size: int,
    names: tuple[str, ...] = ("bos_token_id", "eos_token_id"),
    default: int = GPT2_DEFAULT_TOKEN_ID,
) -> None:
    """Unset special-token ids that would index past ``vocab_size``.

    Hugging Face config defaults assume the original vocabulary (GPT-2's 50256, BERT's pad 0);
    ``default`` stands for an id the dict does not set.
    """
    for name in names:
        value = config_fields.get(name, default)
        if value is not None and value >= vocab_size:
            config_fields[name] = None
