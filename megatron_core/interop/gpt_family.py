"""Shared base of the Hugging Face families that become our ``GPTModel`` (GPT-2, Llama, GPT-J...).

It builds the model from a spec factory named by the family and reads a blueprint back from a
``GPTModel``; the subclasses only map configs and state dicts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from megatron_core.interop.registry import Blueprint, HFFamily, HFInteropError, UnsupportedHFConfigError

# HF activation name -> our activation_func name, for the names that compute the same function.
# The tanh-approximated GELUs differ only by float rounding (their formulas are equal).
HF_ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "relu2": "squared_relu",
    "silu": "silu",
    "swish": "silu",
}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype, model_type: str) -> str:
    """Our ``params_dtype`` name for a torch dtype; raise for dtypes we do not train in."""
    if dtype not in _DTYPE_NAMES:
        raise UnsupportedHFConfigError(
            model_type, "dtype", dtype, "parameters must be float32, bfloat16 or float16",
            "cast the Hugging Face model with .float() before converting",
        )
    return _DTYPE_NAMES[dtype]


def hf_activation_to_ours(model_type: str, field_name: str, name: str) -> str:
    """Map a Hugging Face activation name to ours, refusing the ones with no exact equivalent."""
    if name not in HF_ACTIVATIONS:
        raise UnsupportedHFConfigError(
            model_type, field_name, name, "no activation of ours computes the same function",
            f"use one of {sorted(HF_ACTIVATIONS)}",
        )
    return HF_ACTIVATIONS[name]


def ours_activation_to_hf(ours: str, preferred: str | None, default: str) -> str:
    """HF activation name for our ``ours``: ``preferred`` (e.g. the template's) when it matches."""
    if preferred is not None and HF_ACTIVATIONS.get(preferred) == ours:
        return preferred
    if HF_ACTIVATIONS.get(default) == ours:
        return default
    for hf_name, name in HF_ACTIVATIONS.items():
        if name == ours:
            return hf_name
    raise HFInteropError(f"activation_func={ours!r} has no Hugging Face equivalent")


def _rotary_settings(model: Any) -> dict[str, float]:
    """rotary_percent and rotary_base of a GPTModel: its attributes, else read off its RotaryEmbedding."""
    rotary = model.rotary_pos_emb
    kv_channels = model.config.kv_channels
    percent = getattr(model, "rotary_percent", None)
    if percent is None:
        percent = 1.0 if rotary.dim == kv_channels else rotary.dim / kv_channels
    base = getattr(model, "rotary_base", None)
    if base is None:
        # inv_freq[1] = base ** (-2 / dim); fp32 rounding leaves ~1e-6 relative error, so keep
        # 5 significant digits (bases are round numbers: 1e4, 5e5, 1e6...).
        raw = float(rotary.inv_freq[1].double() ** (-rotary.dim / 2))
        base = float(f"{raw:.5g}")
    return {"rotary_percent": float(percent), "rotary_base": float(base)}


class GPTModelFamily(HFFamily):
    """A family whose model of ours is ``megatron_core.models.gpt.GPTModel`` built from a layer spec."""

    #: ``"module:function"`` returning the layer spec, e.g. ``"specs.gpt:get_gpt_layer_local_spec"``.
    spec_factory: ClassVar[str]

    def layer_spec(self) -> Any:
        module_name, _, fn_name = self.spec_factory.partition(":")
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), fn_name)
        return factory()

    def build_model(self, blueprint: Blueprint, spec: Any | None = None) -> torch.nn.Module:
        """A ``GPTModel`` (TP=1) for ``blueprint``, from ``spec`` or this family's default local spec."""
        from megatron_core.models.gpt import GPTModel

        return GPTModel(
            blueprint.config,
            spec if spec is not None else self.layer_spec(),
            **blueprint.model_kwargs,
        )

    def blueprint_of(self, model: torch.nn.Module) -> Blueprint:
        from megatron_core.models.gpt import GPTModel

        if not isinstance(model, GPTModel):
            raise HFInteropError(
                f"{self.model_type}: expected a megatron_core GPTModel, got {type(model).__name__}"
            )
        if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
            raise HFInteropError(
                f"{self.model_type}: the model is one pipeline stage (pre_process/post_process False); "
                "Fix: convert a whole model (pipeline_model_parallel_size=1)."
            )
        kwargs: dict[str, Any] = {
            "vocab_size": model.vocab_size,
            "max_sequence_length": model.max_sequence_length,
            "position_embedding_type": model.position_embedding_type,
            "share_embeddings_and_output_weights": model.share_embeddings_and_output_weights,
        }
        if model.position_embedding_type == "rope":
            kwargs.update(_rotary_settings(model))
        return Blueprint(self.model_type, model.config, kwargs)

    @staticmethod
    def add_output_layer(state_dict: dict[str, torch.Tensor], blueprint: Blueprint, weight: torch.Tensor) -> None:
        """Store the untied output layer; a tied model keeps it in the word embedding only."""
        if not blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            state_dict["output_layer.weight"] = weight

    @staticmethod
    def output_weight(state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> torch.Tensor:
        """The output projection ``[vocab, hidden]`` of our state dict, tied or not."""
        if blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            return state_dict["embedding.word_embeddings.weight"]
        return state_dict["output_layer.weight"]
