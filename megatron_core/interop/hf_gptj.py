"""GPT-J (Hugging Face ``GPTJForCausalLM``) <-> our ``GPTModel`` with the GPT-J spec (``specs.gptj``).

Mapping: one ``ln_1`` feeding attention and MLP in parallel (``ParallelAttentionMLPLayer``),
bias-free ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (fused into our per-head ``linear_qkv``),
biased ``fc_in``/``fc_out``, ``gelu_new`` = our ``gelu_tanh``, rotary on the first ``rotary_dim``
channels of each head with GPT-J's ``rotate_every_two`` = our interleaved rotary
(``rotary_percent = rotary_dim / head_dim``, base 10000), and a head with a bias
(``output_layer_bias``), untied unless the model ties ``lm_head`` to ``wte``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import (
    GPTModelFamily,
    gpt2_style_config_fields,
    gpt2_style_hf_fields,
    head_rules,
)
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import config_qkv_transforms
from megatron_core.interop.registry import (
    Blueprint,
    HFInteropError,
    UnsupportedHFConfigError,
    drop_token_ids_outside_vocab,
)

_IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias", "embed_positions")
_GPTJ_ROTARY_BASE = 10000.0


def _rotary_percent(rotary_dim: int | None, head_dim: int) -> float:
    """``rotary_dim / head_dim``, checked to give back exactly ``rotary_dim`` channels in RotaryEmbedding."""
    if rotary_dim is None:
        raise UnsupportedHFConfigError(
            "gptj", "rotary_dim", None, "Hugging Face then builds angles for hidden_size channels, which only "
            "fits one attention head", "set rotary_dim (GPT-J 6B: 64)",
        )
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise UnsupportedHFConfigError(
            "gptj", "rotary_dim", rotary_dim, f"must be even and in (0, head_dim={head_dim}]", "use an even rotary_dim",
        )
    percent = rotary_dim / head_dim
    if int(head_dim * percent) != rotary_dim:
        raise UnsupportedHFConfigError(
            "gptj", "rotary_dim", rotary_dim, f"{rotary_dim}/{head_dim} does not round-trip through a float percent",
            "use a rotary_dim that is a power-of-two fraction of head_dim",
        )
    return percent


class GPTJFamily(GPTModelFamily):
    """Converter for ``model_type="gptj"``."""

    model_type = "gptj"
    hf_model_classes = ("GPTJForCausalLM",)
    spec_factory = "specs.gptj:get_gptj_layer_local_spec"

    # ------------------------------------------------------------------ configs
    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        c = hf_config
        if c.n_embd % c.n_head:
            raise UnsupportedHFConfigError("gptj", "n_embd", c.n_embd, f"not divisible by n_head={c.n_head}",
                                           "use n_embd divisible by n_head")
        head_dim = c.n_embd // c.n_head
        config = TransformerConfig(
            **gpt2_style_config_fields(c),
            rotary_interleaved=True,
            use_scaled_init_method=False,
        )
        return Blueprint("gptj", config, {
            "vocab_size": c.vocab_size,
            "max_sequence_length": c.n_positions,
            "position_embedding_type": "rope",
            "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
            "rotary_percent": _rotary_percent(c.rotary_dim, head_dim),
            "rotary_base": _GPTJ_ROTARY_BASE,
            "output_layer_bias": True,
        })

    def blueprint_from_hf_model(self, hf_model: Any) -> Blueprint:
        """The config's blueprint, tied or not as the model's head really is."""
        blueprint = self.blueprint_from_hf(hf_model.config)
        tied = hf_model.lm_head.weight is hf_model.transformer.wte.weight
        blueprint.model_kwargs["share_embeddings_and_output_weights"] = tied
        return blueprint

    def blueprint_of(self, model: torch.nn.Module) -> Blueprint:
        """GPTModel's blueprint, checked to be built from parallel attention + MLP layers with one norm."""
        from megatron_core.transformer.parallel_attention_mlp_layer import ParallelAttentionMLPLayer

        blueprint = super().blueprint_of(model)
        layers = list(model.decoder.layers)  # type: ignore[union-attr, arg-type]
        if not all(isinstance(layer, ParallelAttentionMLPLayer) and layer.shared_norm for layer in layers):
            raise HFInteropError(
                "gptj: the model's layers are not ParallelAttentionMLPLayer with one shared norm; GPT-J needs "
                "the parallel layer of specs.gptj.get_gptj_layer_local_spec()"
            )
        blueprint.model_kwargs["output_layer_bias"] = bool(getattr(model, "output_layer_bias", False))
        return blueprint

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        assert cfg.kv_channels is not None
        checks = [
            (kw["position_embedding_type"] == "rope", f"position_embedding_type={kw['position_embedding_type']!r}"),
            (cfg.rotary_interleaved, "rotary_interleaved=False (GPT-J rotates pairs (2i, 2i+1))"),
            (math.isclose(kw.get("rotary_base", 0.0), _GPTJ_ROTARY_BASE), f"rotary_base={kw.get('rotary_base')} (GPT-J: 10000)"),
            (kw.get("seq_len_interpolation_factor") is None, "seq_len_interpolation_factor"),
            (kw.get("output_layer_bias", False), "output_layer_bias=False (GPT-J's head has a bias)"),
            (cfg.normalization == "LayerNorm", f"normalization={cfg.normalization!r} (GPT-J has LayerNorm)"),
            (cfg.add_bias_linear and not cfg.gated_linear_unit, "MLP without biases or gated"),
            (cfg.num_query_groups == cfg.num_attention_heads, "grouped-query attention (GPT-J is MHA)"),
            (cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size, "kv_channels * heads != hidden_size"),
            (cfg.softmax_scale is None or math.isclose(cfg.softmax_scale, cfg.kv_channels ** -0.5),
             f"softmax_scale={cfg.softmax_scale} (GPT-J: 1/sqrt(head_dim))"),
            (not cfg.qk_layernorm and not cfg.layernorm_zero_centered_gamma, "qk_layernorm / zero-centred gamma"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "GPT-J cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import GPTJConfig

        cfg, kw = blueprint.config, blueprint.model_kwargs
        assert cfg.kv_channels is not None
        base = template.to_dict() if template is not None else {}
        base.update(gpt2_style_hf_fields(blueprint, base), rotary_dim=int(cfg.kv_channels * kw["rotary_percent"]))
        if template is None:
            drop_token_ids_outside_vocab(base, kw["vocab_size"])
        return GPTJConfig.from_dict(base)

    # ------------------------------------------------------------------ state dicts
    def key_table(self, blueprint: Blueprint) -> KeyTable:
        """GPT-J's keys: bias-free ``q/k/v_proj`` -> per-head ``linear_qkv``, a head with a bias."""
        ours, hf = "decoder.layers.{layer}.", "transformer.h.{layer}."
        rules: list[KeyRule | Alias] = [
            KeyRule("embedding.word_embeddings.weight", "transformer.wte.weight"),
            KeyRule(ours + "input_layernorm.{p}", hf + "ln_1.{p}"),
            KeyRule(ours + "self_attention.linear_qkv.weight", tuple(hf + f"attn.{x}_proj.weight" for x in "qkv"),
                    *config_qkv_transforms(blueprint.config)),
            KeyRule(ours + "self_attention.linear_proj.weight", hf + "attn.out_proj.weight"),
            KeyRule(ours + "mlp.linear_fc1.{p}", hf + "mlp.fc_in.{p}"),
            KeyRule(ours + "mlp.linear_fc2.{p}", hf + "mlp.fc_out.{p}"),
            KeyRule("decoder.final_layernorm.{p}", "transformer.ln_f.{p}"),
            *head_rules(blueprint.model_kwargs["share_embeddings_and_output_weights"], "transformer.wte.weight"),
            KeyRule("output_layer.bias", "lm_head.bias"),
        ]
        placeholders: dict[str, int | tuple[str, ...]] = {"layer": blueprint.config.num_layers, "p": ("weight", "bias")}
        return KeyTable("gptj", rules, placeholders, hf_ignore=_IGNORED_BUFFERS)
