"""GPT-2 (Hugging Face ``GPT2LMHeadModel``) <-> our ``GPTModel`` with the local GPT spec.

Mapping: LayerNorm, biases everywhere, learned absolute positions (``n_positions``), MHA
(num_query_groups = heads), ``gelu_new`` = our ``gelu_tanh``, tied output layer unless
``tie_word_embeddings=False``. GPT-2's ``Conv1D`` stores weights ``[in, out]`` (transposed), and
``c_attn`` holds ``[q; k; v]`` blocks, which become our per-head ``[q_i; k_i; v_i]`` rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import (
    HF_ACTIVATIONS,
    GPTModelFamily,
    hf_activation_to_ours,
    ours_activation_to_hf,
)
from megatron_core.interop.layouts import conv1d_to_linear, fuse_qkv, linear_to_conv1d, split_qkv
from megatron_core.interop.registry import (
    Blueprint,
    KeyTaker,
    StateDict,
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
            num_layers=c.n_layer,
            hidden_size=c.n_embd,
            num_attention_heads=c.n_head,
            ffn_hidden_size=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
            hidden_dropout=c.resid_pdrop,
            attention_dropout=c.attn_pdrop,
            layernorm_epsilon=c.layer_norm_epsilon,
            normalization="LayerNorm",
            add_bias_linear=True,
            activation_func=hf_activation_to_ours("gpt2", "activation_function", c.activation_function),
            softmax_scale=None if c.scale_attn_weights else 1.0,
            attention_softmax_in_fp32=True,
            init_method_std=c.initializer_range,
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
            vocab_size=kw["vocab_size"],
            n_positions=kw["max_sequence_length"],
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_attention_heads,
            n_inner=None if cfg.ffn_hidden_size == 4 * cfg.hidden_size and base.get("n_inner") is None
            else cfg.ffn_hidden_size,
            activation_function=ours_activation_to_hf(cfg.activation_func, base.get("activation_function"), "gelu_new"),
            resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=base.get("embd_pdrop", cfg.hidden_dropout),
            attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.layernorm_epsilon,
            initializer_range=cfg.init_method_std,
            scale_attn_weights=cfg.softmax_scale != 1.0,
            scale_attn_by_inverse_layer_idx=False,
            add_cross_attention=False,
            tie_word_embeddings=kw["share_embeddings_and_output_weights"],
        )
        if template is None:
            # GPT2Config defaults to GPT-2's token ids (50256), invalid in a smaller vocabulary.
            drop_token_ids_outside_vocab(base, kw["vocab_size"])
        return GPT2Config.from_dict(base)

    # ------------------------------------------------------------------ state dicts
    def state_dict_from_hf(self, hf_state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        cfg = blueprint.config
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        assert cfg.kv_channels is not None
        take = KeyTaker(hf_state_dict, "gpt2 state dict", ignore=_IGNORED_BUFFERS)
        out: StateDict = {
            "embedding.word_embeddings.weight": take("transformer.wte.weight"),
            "embedding.position_embeddings.weight": take("transformer.wpe.weight"),
        }
        for i in range(cfg.num_layers):
            hf, ours = f"transformer.h.{i}.", f"decoder.layers.{i}."
            # c_attn: Conv1D [h, 3h] -> Linear [3h, h] = [q; k; v], each [heads*d, h]
            q, k, v = torch.split(conv1d_to_linear(take(hf + "attn.c_attn.weight")), hidden, dim=0)
            qb, kb, vb = torch.split(take(hf + "attn.c_attn.bias"), hidden, dim=0)
            dims = {"num_heads": heads, "num_groups": heads, "head_dim": cfg.kv_channels}
            out.update({
                ours + "input_layernorm.weight": take(hf + "ln_1.weight"),
                ours + "input_layernorm.bias": take(hf + "ln_1.bias"),
                ours + "self_attention.linear_qkv.weight": fuse_qkv(q, k, v, **dims),
                ours + "self_attention.linear_qkv.bias": fuse_qkv(qb, kb, vb, **dims),
                ours + "self_attention.linear_proj.weight": conv1d_to_linear(take(hf + "attn.c_proj.weight")),
                ours + "self_attention.linear_proj.bias": take(hf + "attn.c_proj.bias"),
                ours + "pre_mlp_layernorm.weight": take(hf + "ln_2.weight"),
                ours + "pre_mlp_layernorm.bias": take(hf + "ln_2.bias"),
                ours + "mlp.linear_fc1.weight": conv1d_to_linear(take(hf + "mlp.c_fc.weight")),
                ours + "mlp.linear_fc1.bias": take(hf + "mlp.c_fc.bias"),
                ours + "mlp.linear_fc2.weight": conv1d_to_linear(take(hf + "mlp.c_proj.weight")),
                ours + "mlp.linear_fc2.bias": take(hf + "mlp.c_proj.bias"),
            })
        out["decoder.final_layernorm.weight"] = take("transformer.ln_f.weight")
        out["decoder.final_layernorm.bias"] = take("transformer.ln_f.bias")
        if blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            if take.has("lm_head.weight"):
                take("lm_head.weight")  # the same tensor as wte
        else:
            self.add_output_layer(out, blueprint, take("lm_head.weight"))
        take.finish()
        return out

    def state_dict_to_hf(self, state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        cfg = blueprint.config
        heads = cfg.num_attention_heads
        assert cfg.kv_channels is not None
        take = KeyTaker(state_dict, "our GPT state dict", ignore=("_extra_state",))
        out: StateDict = {
            "transformer.wte.weight": take("embedding.word_embeddings.weight"),
            "transformer.wpe.weight": take("embedding.position_embeddings.weight"),
        }
        dims = {"num_heads": heads, "num_groups": heads, "head_dim": cfg.kv_channels}
        for i in range(cfg.num_layers):
            hf, ours = f"transformer.h.{i}.", f"decoder.layers.{i}."
            q, k, v = split_qkv(take(ours + "self_attention.linear_qkv.weight"), **dims)
            qb, kb, vb = split_qkv(take(ours + "self_attention.linear_qkv.bias"), **dims)
            out.update({
                hf + "ln_1.weight": take(ours + "input_layernorm.weight"),
                hf + "ln_1.bias": take(ours + "input_layernorm.bias"),
                hf + "attn.c_attn.weight": linear_to_conv1d(torch.cat([q, k, v], dim=0)),
                hf + "attn.c_attn.bias": torch.cat([qb, kb, vb], dim=0),
                hf + "attn.c_proj.weight": linear_to_conv1d(take(ours + "self_attention.linear_proj.weight")),
                hf + "attn.c_proj.bias": take(ours + "self_attention.linear_proj.bias"),
                hf + "ln_2.weight": take(ours + "pre_mlp_layernorm.weight"),
                hf + "ln_2.bias": take(ours + "pre_mlp_layernorm.bias"),
                hf + "mlp.c_fc.weight": linear_to_conv1d(take(ours + "mlp.linear_fc1.weight")),
                hf + "mlp.c_fc.bias": take(ours + "mlp.linear_fc1.bias"),
                hf + "mlp.c_proj.weight": linear_to_conv1d(take(ours + "mlp.linear_fc2.weight")),
                hf + "mlp.c_proj.bias": take(ours + "mlp.linear_fc2.bias"),
            })
        out["transformer.ln_f.weight"] = take("decoder.final_layernorm.weight")
        out["transformer.ln_f.bias"] = take("decoder.final_layernorm.bias")
        if blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            out["lm_head.weight"] = out["transformer.wte.weight"]
            if take.has("output_layer.weight"):
                take("output_layer.weight")
        else:
            out["lm_head.weight"] = take("output_layer.weight")
        take.finish()
        return out

