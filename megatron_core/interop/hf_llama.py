"""Llama (Hugging Face ``LlamaForCausalLM``) <-> our ``GPTModel`` with the local Llama spec.

Mapping: RMSNorm (``rms_norm_eps``), gated MLP (``silu`` -> swiglu, ``gate_proj``/``up_proj`` ->
``linear_fc1 = [gate; up]``, ``down_proj`` -> ``linear_fc2``), GQA (``num_key_value_heads`` ->
``num_query_groups``), default RoPE (``rope_theta`` -> ``rotary_base``). Hugging Face Llama rotates
with ``rotate_half`` (first half / second half of each head), which is our non-interleaved rotary,
so q/k rows are copied without any permutation. Output layer untied unless ``tie_word_embeddings``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import GPTModelFamily, hf_activation_to_ours, ours_activation_to_hf
from megatron_core.interop.layouts import fuse_gated_fc1, fuse_qkv, split_gated_fc1, split_qkv
from megatron_core.interop.registry import Blueprint, KeyTaker, StateDict, UnsupportedHFConfigError

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
    @staticmethod
    def _dims(cfg: TransformerConfig) -> dict[str, int]:
        assert cfg.kv_channels is not None and cfg.num_query_groups is not None
        return {"num_heads": cfg.num_attention_heads, "num_groups": cfg.num_query_groups, "head_dim": cfg.kv_channels}

    def state_dict_from_hf(self, hf_state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        cfg = blueprint.config
        dims, bias = self._dims(cfg), cfg.add_bias_linear
        take = KeyTaker(hf_state_dict, "llama state dict", ignore=("rotary_emb.inv_freq",))
        out: StateDict = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight")}
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            out[ours + "input_layernorm.weight"] = take(hf + "input_layernorm.weight")
            for suffix in ("weight", "bias") if bias else ("weight",):
                out[ours + f"self_attention.linear_qkv.{suffix}"] = fuse_qkv(
                    take(attn + f"q_proj.{suffix}"), take(attn + f"k_proj.{suffix}"),
                    take(attn + f"v_proj.{suffix}"), **dims,
                )
                out[ours + f"self_attention.linear_proj.{suffix}"] = take(attn + f"o_proj.{suffix}")
                out[ours + f"mlp.linear_fc1.{suffix}"] = fuse_gated_fc1(
                    take(mlp + f"gate_proj.{suffix}"), take(mlp + f"up_proj.{suffix}")
                )
                out[ours + f"mlp.linear_fc2.{suffix}"] = take(mlp + f"down_proj.{suffix}")
            out[ours + "pre_mlp_layernorm.weight"] = take(hf + "post_attention_layernorm.weight")
        out["decoder.final_layernorm.weight"] = take("model.norm.weight")
        if blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            if take.has("lm_head.weight"):
                take("lm_head.weight")  # the same tensor as embed_tokens
        else:
            self.add_output_layer(out, blueprint, take("lm_head.weight"))
        take.finish()
        return out

    def state_dict_to_hf(self, state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        cfg = blueprint.config
        dims, bias = self._dims(cfg), cfg.add_bias_linear
        take = KeyTaker(state_dict, "our GPT state dict", ignore=("_extra_state",))
        out: StateDict = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")}
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            out[hf + "input_layernorm.weight"] = take(ours + "input_layernorm.weight")
            for suffix in ("weight", "bias") if bias else ("weight",):
                q, k, v = split_qkv(take(ours + f"self_attention.linear_qkv.{suffix}"), **dims)
                out.update({attn + f"q_proj.{suffix}": q, attn + f"k_proj.{suffix}": k, attn + f"v_proj.{suffix}": v})
                out[attn + f"o_proj.{suffix}"] = take(ours + f"self_attention.linear_proj.{suffix}")
                gate, up = split_gated_fc1(take(ours + f"mlp.linear_fc1.{suffix}"))
                out.update({mlp + f"gate_proj.{suffix}": gate, mlp + f"up_proj.{suffix}": up})
                out[mlp + f"down_proj.{suffix}"] = take(ours + f"mlp.linear_fc2.{suffix}")
            out[hf + "post_attention_layernorm.weight"] = take(ours + "pre_mlp_layernorm.weight")
        out["model.norm.weight"] = take("decoder.final_layernorm.weight")
        if blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
            if take.has("output_layer.weight"):
                take("output_layer.weight")
        else:
            out["lm_head.weight"] = take("output_layer.weight")
        take.finish()
        return out
