"""Shared base of the Hugging Face families that become our ``GPTModel`` (GPT-2, Llama, GPT-J...).

It builds the model from a spec factory named by the family and reads a blueprint back from a
``GPTModel``; the subclasses only map configs and state dicts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from megatron_core.interop.keymap import Alias, KeyRule
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


def gpt2_style_config_fields(hf_config: Any) -> dict[str, Any]:
    """``TransformerConfig`` fields read the same way from GPT-2-style configs (``GPT2Config``, ``GPTJConfig``).

    Those configs share the names ``n_layer``, ``n_embd``, ``n_head``, ``n_inner``, ``resid_pdrop``,
    ``attn_pdrop``, ``layer_norm_epsilon``, ``activation_function`` and a LayerNorm model with biases.
    """
    c = hf_config
    return {
        "num_layers": c.n_layer,
        "hidden_size": c.n_embd,
        "num_attention_heads": c.n_head,
        "ffn_hidden_size": c.n_inner if c.n_inner is not None else 4 * c.n_embd,
        "hidden_dropout": c.resid_pdrop,
        "attention_dropout": c.attn_pdrop,
        "layernorm_epsilon": c.layer_norm_epsilon,
        "normalization": "LayerNorm",
        "add_bias_linear": True,
        "activation_func": hf_activation_to_ours(c.model_type, "activation_function", c.activation_function),
        "init_method_std": c.initializer_range,
    }


def gpt2_style_hf_fields(blueprint: Blueprint, base: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`gpt2_style_config_fields` (plus vocabulary, positions, tying); ``base`` is the template."""
    cfg, kw = blueprint.config, blueprint.model_kwargs
    default_inner = cfg.ffn_hidden_size == 4 * cfg.hidden_size and base.get("n_inner") is None
    return {
        "vocab_size": kw["vocab_size"],
        "n_positions": kw["max_sequence_length"],
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_attention_heads,
        "n_inner": None if default_inner else cfg.ffn_hidden_size,
        "activation_function": ours_activation_to_hf(cfg.activation_func, base.get("activation_function"), "gelu_new"),
        "resid_pdrop": cfg.hidden_dropout,
        "embd_pdrop": base.get("embd_pdrop", cfg.hidden_dropout),
        "attn_pdrop": cfg.attention_dropout,
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": kw["share_embeddings_and_output_weights"],
    }


def head_rules(
    tied: bool, embedding_hf: str, *, head_hf: str = "lm_head.weight", ours: str = "output_layer.weight",
    strict: bool = True,
) -> list[KeyRule | Alias]:
    """Key rules of an output head: its own weight when untied, else an alias of the word embedding.

    Args:
        tied: ``share_embeddings_and_output_weights`` (ours then has no output weight).
        embedding_hf: the Hugging Face key of the word embedding the head is tied to.
        head_hf: the Hugging Face key of the head weight.
        ours: our key of the untied head weight.
        strict: when tied, the Hugging Face head key must be present and equal to the embedding
            (``False``: it may be absent and is not compared).
    """
    if tied:
        return [Alias(head_hf, embedding_hf, required=strict, check=strict)]
    return [KeyRule(ours, head_hf)]


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
