"""GPT-2 (Hugging Face ``GPT2LMHeadModel``) <-> our ``GPTModel`` with the local GPT spec.

Mapping: LayerNorm, biases everywhere, learned absolute positions (``n_positions``), MHA
(num_query_groups = heads), ``gelu_new`` = our ``gelu_tanh``, tied output layer unless
``tie_word_embeddings=False``. GPT-2's ``Conv1D`` stores weights ``[in, out]`` (transposed), and
``c_attn`` holds ``[q; k; v]`` blocks, which become our per-head ``[q_i; k_i; v_i]`` rows.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import (
    HF_ACTIVATIONS,
    GPTModelFamily,
    gpt2_style_config_fields,
    gpt2_style_hf_fields,
    head_rules,
)
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import TRANSPOSE, chain, config_qkv_transforms, split_rows_transforms
from megatron_core.interop.registry import (
    Blueprint,
    UnsupportedHFConfigError,
    drop_token_ids_outside_vocab,
)

logger = logging.getLogger(__name__)

# Buffers that older transformers versions saved in GPT-2 attention modules (causal mask, -1e4).
_IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT2Family(GPTModelFamily):
    """Converter for ``model_type="gpt2"``."""

    model_type = "gpt2"
    hf_model_classes = ("GPT2LMHeadModel",)
    spec_factory = "specs.gpt:get_gpt_layer_local_spec"

    # ------------------------------------------------------------------ configs
    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        """GPT2Config -> blueprint; refuses cross-attention and per-layer attention scaling."""
        c = hf_config
        if c.add_cross_attention:
            raise UnsupportedHFConfigError(
                "gpt2", "add_cross_attention", True, "our GPTModel is decoder-only (no cross-attention)",
                "convert a GPT-2 without cross-attention",
            )
        if c.scale_attn_by_inverse_layer_idx:
            raise UnsupportedHFConfigError(
                "gpt2", "scale_attn_by_inverse_layer_idx", True,
                "it scales each layer's attention scores by 1/(layer_idx+1), and our config has one "
                "softmax_scale for all layers", "use scale_attn_by_inverse_layer_idx=False",
            )
        if c.reorder_and_upcast_attn:
            # Only changes where the scale is applied and forces fp32 scores: same function.
            logger.info("gpt2: reorder_and_upcast_attn=True maps to fp32 softmax (attention_softmax_in_fp32)")
        if c.embd_pdrop != c.resid_pdrop:
            logger.warning(
                "gpt2: embd_pdrop=%s differs from resid_pdrop=%s; our embedding dropout uses hidden_dropout=%s "
                "(training only; inference is unaffected)", c.embd_pdrop, c.resid_pdrop, c.resid_pdrop,
            )
        head_dim = c.n_embd // c.n_head
        config = TransformerConfig(
            **gpt2_style_config_fields(c),
            softmax_scale=None if c.scale_attn_weights else 1.0,
            attention_softmax_in_fp32=True,
            use_scaled_init_method=True,
        )
        assert config.kv_channels == head_dim
        return Blueprint(
            "gpt2",
            config,
            {
                "vocab_size": c.vocab_size,
                "max_sequence_length": c.n_positions,
                "position_embedding_type": "learned_absolute",
                "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
            },
        )

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        assert cfg.kv_channels is not None
        checks = [
            (kw["position_embedding_type"] == "learned_absolute",
             f"position_embedding_type={kw['position_embedding_type']!r} (GPT-2 has learned_absolute)"),
            (cfg.normalization == "LayerNorm", f"normalization={cfg.normalization!r} (GPT-2 has LayerNorm)"),
            (not cfg.gated_linear_unit, f"gated MLP activation_func={cfg.activation_func!r}"),
            (cfg.activation_func in set(HF_ACTIVATIONS.values()), f"activation_func={cfg.activation_func!r}"),
            (cfg.add_bias_linear, "add_bias_linear=False (GPT-2 has biases on every linear)"),
            (cfg.num_query_groups == cfg.num_attention_heads,
             f"num_query_groups={cfg.num_query_groups} != num_attention_heads (GPT-2 is MHA)"),
            (cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size,
             f"kv_channels={cfg.kv_channels} * heads != hidden_size={cfg.hidden_size}"),
            (cfg.layernorm_position == "pre", "layernorm_position='post'"),
            (not cfg.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm"),
            (not cfg.qk_layernorm, "qk_layernorm=True"),
            (not cfg.layernorm_zero_centered_gamma, "layernorm_zero_centered_gamma=True"),
            (cfg.softmax_scale in (None, 1.0) or math.isclose(cfg.softmax_scale, cfg.kv_channels**-0.5),
             f"softmax_scale={cfg.softmax_scale} (GPT-2 has 1/sqrt(head_dim) or 1)"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "GPT-2 cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import GPT2Config

        cfg, kw = blueprint.config, blueprint.model_kwargs
        base = template.to_dict() if template is not None else {}
        base.update(
            gpt2_style_hf_fields(blueprint, base),
            scale_attn_weights=cfg.softmax_scale != 1.0,
            scale_attn_by_inverse_layer_idx=False,
            add_cross_attention=False,
        )
        if template is None:
            # GPT2Config defaults to GPT-2's token ids (50256), invalid in a smaller vocabulary.
            drop_token_ids_outside_vocab(base, kw["vocab_size"])
        return GPT2Config.from_dict(base)

    # ------------------------------------------------------------------ state dicts
    def key_table(self, blueprint: Blueprint) -> KeyTable:
        """GPT-2's keys: ``Conv1D`` weights transposed, ``c_attn = [q; k; v]`` -> per-head ``linear_qkv``."""
        qkv = config_qkv_transforms(blueprint.config)
        ours, hf = "decoder.layers.{layer}.", "transformer.h.{layer}."
        rules: list[KeyRule | Alias] = [
            KeyRule("embedding.word_embeddings.weight", "transformer.wte.weight"),
            KeyRule("embedding.position_embeddings.weight", "transformer.wpe.weight"),
            KeyRule(ours + "input_layernorm.{p}", hf + "ln_1.{p}"),
            KeyRule(ours + "self_attention.linear_qkv.weight", hf + "attn.c_attn.weight",
                    *chain(TRANSPOSE, split_rows_transforms(3), qkv)),
            KeyRule(ours + "self_attention.linear_qkv.bias", hf + "attn.c_attn.bias", *chain(split_rows_transforms(3), qkv)),
            KeyRule(ours + "self_attention.linear_proj.weight", hf + "attn.c_proj.weight", *TRANSPOSE),
            KeyRule(ours + "self_attention.linear_proj.bias", hf + "attn.c_proj.bias"),
            KeyRule(ours + "pre_mlp_layernorm.{p}", hf + "ln_2.{p}"),
            KeyRule(ours + "mlp.linear_fc1.weight", hf + "mlp.c_fc.weight", *TRANSPOSE),
            KeyRule(ours + "mlp.linear_fc1.bias", hf + "mlp.c_fc.bias"),
            KeyRule(ours + "mlp.linear_fc2.weight", hf + "mlp.c_proj.weight", *TRANSPOSE),
            KeyRule(ours + "mlp.linear_fc2.bias", hf + "mlp.c_proj.bias"),
            KeyRule("decoder.final_layernorm.{p}", "transformer.ln_f.{p}"),
            # Tied: lm_head.weight, when saved, is the same tensor as wte.
            *head_rules(blueprint.model_kwargs["share_embeddings_and_output_weights"], "transformer.wte.weight",
                        strict=False),
        ]
        return KeyTable("gpt2", rules, {"layer": blueprint.config.num_layers, "p": ("weight", "bias")},
                        hf_ignore=_IGNORED_BUFFERS)
