"""Llama (Hugging Face ``LlamaForCausalLM``) <-> our ``GPTModel`` with the local Llama spec.

Mapping: RMSNorm (``rms_norm_eps``), gated MLP (``silu`` -> swiglu, ``gate_proj``/``up_proj`` ->
``linear_fc1 = [gate; up]``, ``down_proj`` -> ``linear_fc2``), GQA (``num_key_value_heads`` ->
``num_query_groups``), default RoPE (``rope_theta`` -> ``rotary_base``). Hugging Face Llama rotates
with ``rotate_half`` (first half / second half of each head), which is our non-interleaved rotary,
so q/k rows are copied without any permutation. Output layer untied unless ``tie_word_embeddings``.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import (
    GPTModelFamily,
    head_rules,
    hf_activation_to_ours,
    ours_activation_to_hf,
)
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import GATED_FC1, config_qkv_transforms
from megatron_core.interop.registry import Blueprint, UnsupportedHFConfigError

# Gated activations of ours by the gate's elementwise function.
_GATED = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}
_GATE_OF = {gated: fn for fn, gated in _GATED.items()}


def _rope_theta(hf_config: Any) -> float:
    """rope_theta from ``rope_parameters`` (transformers 5) or the older top-level fields."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedHFConfigError(
            "llama", "rope_parameters.rope_type", rope_type,
            "only unscaled RoPE is implemented (no llama3 / linear / dynamic / yarn frequency scaling)",
            "use rope_type='default'",
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta) if theta is not None else 10000.0


class LlamaFamily(GPTModelFamily):
    """Converter for ``model_type="llama"``."""

    model_type = "llama"
    hf_model_classes = ("LlamaForCausalLM",)
    spec_factory = "specs.llama:get_llama_layer_local_spec"

    # ------------------------------------------------------------------ configs
    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        """LlamaConfig -> blueprint; refuses scaled RoPE and mixed attention/MLP biases."""
        c = hf_config
        if bool(c.attention_bias) != bool(c.mlp_bias):
            raise UnsupportedHFConfigError(
                "llama", "attention_bias", c.attention_bias,
                f"with mlp_bias={c.mlp_bias}: our add_bias_linear puts biases on all four projections "
                "(qkv, output, fc1, fc2) or on none", "set attention_bias and mlp_bias to the same value",
            )
        act = hf_activation_to_ours("llama", "hidden_act", c.hidden_act)
        if act not in _GATED:
            raise UnsupportedHFConfigError(
                "llama", "hidden_act", c.hidden_act, "the gated MLP has no registered gated variant of it",
                f"use one of {sorted(_GATED)}",
            )
        config = TransformerConfig(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_attention_heads=c.num_attention_heads,
            num_query_groups=c.num_key_value_heads,
            kv_channels=c.head_dim,
            ffn_hidden_size=c.intermediate_size,
            hidden_dropout=0.0,
            attention_dropout=float(c.attention_dropout),
            layernorm_epsilon=c.rms_norm_eps,
            normalization="RMSNorm",
            add_bias_linear=bool(c.attention_bias),
            activation_func=_GATED[act],
            init_method_std=c.initializer_range,
            use_scaled_init_method=False,
            rotary_interleaved=False,
        )
        return Blueprint(
            "llama",
            config,
            {
                "vocab_size": c.vocab_size,
                "max_sequence_length": c.max_position_embeddings,
                "position_embedding_type": "rope",
                "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
                "rotary_percent": 1.0,
                "rotary_base": _rope_theta(c),
            },
        )

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        assert cfg.kv_channels is not None
        checks = [
            (cfg.num_moe_experts is None, "num_moe_experts set (an MoE model: mixtral / qwen2_moe / qwen3_moe)"),
            (kw["position_embedding_type"] == "rope",
             f"position_embedding_type={kw['position_embedding_type']!r} (Llama has rope)"),
            (kw.get("rotary_percent", 1.0) == 1.0, f"rotary_percent={kw.get('rotary_percent')} (Llama: 1.0)"),
            (not cfg.rotary_interleaved, "rotary_interleaved=True (Llama rotates halves)"),
            (cfg.normalization == "RMSNorm", f"normalization={cfg.normalization!r} (Llama has RMSNorm)"),
            (cfg.activation_func in _GATE_OF, f"activation_func={cfg.activation_func!r} (Llama: swiglu)"),
            (cfg.add_bias_linear or not cfg.add_qkv_bias,
             "add_qkv_bias without add_bias_linear (Llama's attention_bias also biases o_proj)"),
            (cfg.layernorm_position == "pre", "layernorm_position='post'"),
            (not cfg.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm"),
            (not cfg.qk_layernorm, "qk_layernorm=True"),
            (not cfg.layernorm_zero_centered_gamma, "layernorm_zero_centered_gamma=True"),
            (cfg.hidden_size % cfg.num_attention_heads == 0,
             f"hidden_size={cfg.hidden_size} not divisible by heads (LlamaConfig requires it)"),
            (cfg.softmax_scale is None or math.isclose(cfg.softmax_scale, cfg.kv_channels**-0.5),
             f"softmax_scale={cfg.softmax_scale} (Llama: 1/sqrt(head_dim))"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "Llama cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import LlamaConfig

        cfg, kw = blueprint.config, blueprint.model_kwargs
        base = template.to_dict() if template is not None else {}
        rope = dict(base.get("rope_parameters") or {})
        rope.update(rope_type="default", rope_theta=float(kw["rotary_base"]))
        base.update(
            vocab_size=kw["vocab_size"],
            max_position_embeddings=kw["max_sequence_length"],
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.kv_channels,
            hidden_act=ours_activation_to_hf(_GATE_OF[cfg.activation_func], base.get("hidden_act"), "silu"),
            rms_norm_eps=cfg.layernorm_epsilon,
            initializer_range=cfg.init_method_std,
            attention_dropout=cfg.attention_dropout,
            attention_bias=cfg.add_bias_linear,
            mlp_bias=cfg.add_bias_linear,
            rope_parameters=rope,
            tie_word_embeddings=kw["share_embeddings_and_output_weights"],
        )
        return LlamaConfig.from_dict(base)

    # ------------------------------------------------------------------ state dicts
    #: Our and Hugging Face's key prefix of one decoder layer.
    OURS_LAYER, HF_LAYER = "decoder.layers.{layer}.", "model.layers.{layer}."

    def attention_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        """Norms and attention of one layer: ``q/k/v_proj`` -> per-group ``linear_qkv``, ``o_proj``."""
        ours, hf = self.OURS_LAYER, self.HF_LAYER
        return [
            KeyRule(ours + "input_layernorm.weight", hf + "input_layernorm.weight"),
            KeyRule(ours + "self_attention.linear_qkv.{p}", tuple(hf + f"self_attn.{x}_proj.{{p}}" for x in "qkv"),
                    *config_qkv_transforms(blueprint.config)),
            KeyRule(ours + "self_attention.linear_proj.{p}", hf + "self_attn.o_proj.{p}"),
            KeyRule(ours + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
        ]

    def mlp_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        """The gated MLP of one layer: ``[gate_proj; up_proj]`` -> ``linear_fc1``, ``down_proj`` -> ``linear_fc2``.

        A mixture-of-experts family overrides this (and :meth:`placeholders`).
        """
        del blueprint
        ours, hf = self.OURS_LAYER + "mlp.", self.HF_LAYER + "mlp."
        return [
            KeyRule(ours + "linear_fc1.{p}", (hf + "gate_proj.{p}", hf + "up_proj.{p}"), *GATED_FC1),
            KeyRule(ours + "linear_fc2.{p}", hf + "down_proj.{p}"),
        ]

    def placeholders(self, blueprint: Blueprint) -> dict[str, int | tuple[str, ...]]:
        """Values of the key patterns' placeholders: layers, and the linear parameters (bias or not)."""
        cfg = blueprint.config
        return {"layer": cfg.num_layers, "p": ("weight", "bias") if cfg.add_bias_linear else ("weight",)}

    def key_table(self, blueprint: Blueprint) -> KeyTable:
        tied = blueprint.model_kwargs["share_embeddings_and_output_weights"]
        rules: list[KeyRule | Alias] = [
            KeyRule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            *self.attention_rules(blueprint),
            *self.mlp_rules(blueprint),
            KeyRule("decoder.final_layernorm.weight", "model.norm.weight"),
            # Tied: lm_head.weight, when saved, is the same tensor as embed_tokens.
            *head_rules(tied, "model.embed_tokens.weight", strict=False),
        ]
        return KeyTable(self.model_type, rules, self.placeholders(blueprint), hf_ignore=("rotary_emb.inv_freq",))
