"""T5 (Hugging Face ``T5ForConditionalGeneration``, v1.0 and v1.1) <-> our ``T5Model`` with the local T5 specs.

Mapping: RMSNorm without bias (``T5LayerNorm``), no linear biases, unscaled attention
(``softmax_scale=1``), ``d_kv`` -> ``kv_channels``, relu MLP (v1.0) or gated MLP
(``feed_forward_proj="gated-gelu"``, v1.1: ``wi_0`` is the tanh-GELU gate, ``wi_1`` the linear unit:
``linear_fc1 = [wi_0; wi_1]``). Each stack's relative position bias lives in Hugging Face's first
block only (``block.0.layer.0.SelfAttention.relative_attention_bias``) and becomes the stack's
``{encoder,decoder}_relative_pos_emb``. Cross-attention ``k``/``v`` become our per-head ``linear_kv``
(``[k_h; v_h]`` for each head ``h``).

Head: transformers 5 always ties ``lm_head`` to ``shared`` at construction and reads the scaling
from ``config.scale_decoder_outputs``; checkpoints with their own head (T5 v1.1, FLAN-T5) load
untied. So tying is read from the model object (``lm_head.weight is shared.weight``), scaling from
the config, and ``to_hf`` unties the head of a Hugging Face model built for an untied model of ours.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import (
    HF_ACTIVATIONS,
    head_rules,
    hf_activation_to_ours,
    ours_activation_to_hf,
)
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import GATED_FC1, TransformPair, config_qkv_transforms, kv_transforms
from megatron_core.interop.registry import Blueprint, HFFamily, HFInteropError, UnsupportedHFConfigError

_MAX_SEQUENCE_LENGTH = 512  # T5 has no position table; only learned positions would read this.


def _activation(hf_config: Any) -> tuple[str, bool]:
    """(our activation_func, gated) of a T5Config's feed-forward projection."""
    gated = bool(getattr(hf_config, "is_gated_act", False))
    return hf_activation_to_ours("t5", "feed_forward_proj", hf_config.dense_act_fn), gated


def _feed_forward_proj(activation: str, gated: bool, preferred: str | None) -> tuple[str, str]:
    """(feed_forward_proj, dense_act_fn) for our activation; "gated-gelu" is T5's name for tanh-GELU."""
    if gated and activation == "gelu_tanh":
        return "gated-gelu", "gelu_new"
    hf_name = ours_activation_to_hf(activation, preferred, "relu")
    if gated and hf_name == "gelu":
        hf_name = "gelu_python"  # "gated-gelu" would mean tanh-GELU
    return (f"gated-{hf_name}" if gated else hf_name), hf_name


class T5Family(HFFamily):
    """Converter for ``model_type="t5"`` (``T5ForConditionalGeneration``)."""

    model_type = "t5"
    hf_model_classes = ("T5ForConditionalGeneration",)

    # ------------------------------------------------------------------ configs
    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        """T5Config -> blueprint (decoder config; the encoder differs only in ``encoder_num_layers``)."""
        c = hf_config
        activation, gated = _activation(c)
        config = TransformerConfig(
            num_layers=c.num_decoder_layers if c.num_decoder_layers is not None else c.num_layers,
            hidden_size=c.d_model,
            num_attention_heads=c.num_heads,
            kv_channels=c.d_kv,
            ffn_hidden_size=c.d_ff,
            hidden_dropout=c.dropout_rate,
            attention_dropout=c.dropout_rate,
            layernorm_epsilon=c.layer_norm_epsilon,
            normalization="RMSNorm",
            add_bias_linear=False,
            softmax_scale=1.0,
            activation_func=activation,
            gated_linear_unit=gated,
            init_method_std=c.initializer_factor * c.d_model ** -0.5,
            use_scaled_init_method=False,
        )
        tied = bool(c.tie_word_embeddings)
        return Blueprint("t5", config, {
            "vocab_size": c.vocab_size,
            "max_sequence_length": _MAX_SEQUENCE_LENGTH,
            "encoder_num_layers": c.num_layers,
            "share_embeddings_and_output_weights": tied,
            "scale_decoder_outputs": bool(getattr(c, "scale_decoder_outputs", tied)),
            "position_embedding_type": "relative",
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
        })

    def blueprint_from_hf_model(self, hf_model: Any) -> Blueprint:
        """The config's blueprint, with the head tied or not as the model object really is."""
        blueprint = self.blueprint_from_hf(hf_model.config)
        shared = hf_model.shared.weight
        for stack in ("encoder", "decoder"):
            if getattr(hf_model, stack).embed_tokens.weight is not shared:
                raise UnsupportedHFConfigError(
                    "t5", f"{stack}.embed_tokens", "untied", "our T5Model has one embedding for both stacks",
                    "tie the stacks' embeddings to `shared` (model.set_input_embeddings(model.shared))",
                )
        blueprint.model_kwargs["share_embeddings_and_output_weights"] = hf_model.lm_head.weight is shared
        return blueprint

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        checks = [
            (kw["position_embedding_type"] == "relative", "learned absolute positions (T5 has relative bias)"),
            (cfg.normalization == "RMSNorm", f"normalization={cfg.normalization!r} (T5 has RMSNorm)"),
            (not cfg.add_bias_linear and not cfg.add_qkv_bias, "linear biases (T5 has none)"),
            (cfg.softmax_scale == 1.0, f"softmax_scale={cfg.softmax_scale} (T5 does not scale its scores)"),
            (cfg.activation_func in set(HF_ACTIVATIONS.values()),
             f"activation_func={cfg.activation_func!r} (gated names: use the gate's function + gated_linear_unit)"),
            (cfg.num_query_groups == cfg.num_attention_heads, "grouped-query attention (T5 is MHA)"),
            (cfg.layernorm_position == "pre" and not cfg.apply_residual_connection_post_layernorm,
             "post-norm layers (T5 is pre-norm)"),
            (not cfg.qk_layernorm and not cfg.layernorm_zero_centered_gamma, "qk_layernorm / zero-centred gamma"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "T5 cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import T5Config

        cfg, kw = blueprint.config, blueprint.model_kwargs
        base = template.to_dict() if template is not None else {}
        feed_forward_proj, dense_act_fn = _feed_forward_proj(
            cfg.activation_func, bool(cfg.gated_linear_unit), base.get("dense_act_fn")
        )
        factor = base.get("initializer_factor")
        if factor is None or not math.isclose(factor * cfg.hidden_size ** -0.5, cfg.init_method_std, rel_tol=1e-6):
            factor = cfg.init_method_std * cfg.hidden_size ** 0.5
        base.update(
            vocab_size=kw["vocab_size"],
            d_model=cfg.hidden_size,
            d_kv=cfg.kv_channels,
            d_ff=cfg.ffn_hidden_size,
            num_layers=kw["encoder_num_layers"],
            num_decoder_layers=cfg.num_layers,
            num_heads=cfg.num_attention_heads,
            relative_attention_num_buckets=kw["relative_attention_num_buckets"],
            relative_attention_max_distance=kw["relative_attention_max_distance"],
            dropout_rate=cfg.hidden_dropout,
            layer_norm_epsilon=cfg.layernorm_epsilon,
            initializer_factor=factor,
            feed_forward_proj=feed_forward_proj,
            dense_act_fn=dense_act_fn,
            is_gated_act=bool(cfg.gated_linear_unit),
            tie_word_embeddings=kw["share_embeddings_and_output_weights"],
            # Read by transformers 5 (it wins over tie_word_embeddings there).
            scale_decoder_outputs=kw["scale_decoder_outputs"],
        )
        return T5Config.from_dict(base)

    # ------------------------------------------------------------------ models
    def build_model(self, blueprint: Blueprint, spec: Any | None = None) -> torch.nn.Module:
        """A ``T5Model`` (TP=1); ``spec`` is an ``(encoder_spec, decoder_spec)`` pair, default the local T5 specs."""
        from megatron_core.models.t5 import T5Model
        from specs.t5 import get_t5_decoder_layer_local_spec, get_t5_encoder_layer_local_spec

        if spec is None:
            spec = (get_t5_encoder_layer_local_spec(), get_t5_decoder_layer_local_spec())
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
            raise HFInteropError(f"t5: spec must be an (encoder_spec, decoder_spec) pair, got {type(spec).__name__}")
        kwargs = dict(blueprint.model_kwargs)
        encoder_layers = kwargs.pop("encoder_num_layers")
        config = blueprint.config
        encoder_config = config
        if encoder_layers != config.num_layers:
            encoder_config = TransformerConfig(**{**config.model_dump(), "num_layers": encoder_layers})
        return T5Model(config, spec[0], spec[1], encoder_config=encoder_config, **kwargs)

    def blueprint_of(self, model: torch.nn.Module) -> Blueprint:
        from megatron_core.models.t5 import T5Model

        if not isinstance(model, T5Model):
            raise HFInteropError(f"t5: expected a megatron_core T5Model, got {type(model).__name__}")
        encoder = model.encoder_config.model_dump()
        if {k: v for k, v in encoder.items() if k != "num_layers"} != {
            k: v for k, v in model.config.model_dump().items() if k != "num_layers"
        }:
            raise HFInteropError("t5: the encoder config differs from the decoder's in more than num_layers; "
                                 "Hugging Face T5 has one config for both stacks")
        return Blueprint("t5", model.config, {
            "vocab_size": model.vocab_size,
            "max_sequence_length": model.max_sequence_length,
            "encoder_num_layers": model.encoder_config.num_layers,
            "share_embeddings_and_output_weights": model.share_embeddings_and_output_weights,
            "scale_decoder_outputs": model.scale_decoder_outputs,
            "position_embedding_type": model.position_embedding_type,
            "relative_attention_num_buckets": model.relative_attention_num_buckets,
            "relative_attention_max_distance": model.relative_attention_max_distance,
        })

    def prepare_hf_model(self, hf_model: Any, blueprint: Blueprint) -> None:
        """Give the head its own weight when our model is untied (transformers 5 ties it at build)."""
        if blueprint.model_kwargs["share_embeddings_and_output_weights"]:
            return
        head = hf_model.lm_head
        if head.weight is hf_model.shared.weight:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            tied = getattr(hf_model, "all_tied_weights_keys", None)
            if isinstance(tied, dict):
                tied.pop("lm_head.weight", None)

    # ------------------------------------------------------------------ state dicts
    def key_table(self, blueprint: Blueprint) -> KeyTable:
        """T5's keys: one shared embedding, per-stack relative bias, per-head ``linear_qkv`` / ``linear_kv``."""
        cfg, kw = blueprint.config, blueprint.model_kwargs
        assert cfg.kv_channels is not None
        qkv = config_qkv_transforms(cfg)
        enc, enc_hf = "encoder.layers.{enc}.", "encoder.block.{enc}.layer."
        dec, dec_hf = "decoder.layers.{dec}.", "decoder.block.{dec}.layer."
        cross = dec_hf + "1.EncDecAttention."
        rules: list[KeyRule | Alias] = [
            KeyRule("embedding.word_embeddings.weight", "shared.weight"),
            Alias("{stack}.embed_tokens.weight", "shared.weight", check=True),
            KeyRule("{stack}_relative_pos_emb.relative_attention_bias.weight",
                    "{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            KeyRule("{stack}.final_layernorm.weight", "{stack}.final_layer_norm.weight"),
            *_attention_rules(enc, enc_hf + "0.", qkv),
            *_mlp_rules(enc, enc_hf + "1.", bool(cfg.gated_linear_unit)),
            *_attention_rules(dec, dec_hf + "0.", qkv),
            KeyRule(dec + "pre_cross_attn_layernorm.weight", dec_hf + "1.layer_norm.weight"),
            KeyRule(dec + "cross_attention.linear_q.weight", cross + "q.weight"),
            KeyRule(dec + "cross_attention.linear_kv.weight", (cross + "k.weight", cross + "v.weight"),
                    *kv_transforms(cfg.num_attention_heads, cfg.kv_channels)),
            KeyRule(dec + "cross_attention.linear_proj.weight", cross + "o.weight"),
            *_mlp_rules(dec, dec_hf + "2.", bool(cfg.gated_linear_unit)),
            *head_rules(kw["share_embeddings_and_output_weights"], "shared.weight"),
        ]
        placeholders: dict[str, int | tuple[str, ...]] = {"stack": ("encoder", "decoder"), "enc": kw["encoder_num_layers"], "dec": cfg.num_layers}
        return KeyTable("t5", rules, placeholders, hf_ignore=("EncDecAttention.relative_attention_bias.weight",))


def _attention_rules(ours: str, hf: str, qkv: TransformPair) -> list[KeyRule | Alias]:
    """Pre-norm self-attention sublayer ``hf`` (``layer.N.``) of one block -> ours."""
    attn = hf + "SelfAttention."
    return [
        KeyRule(ours + "input_layernorm.weight", hf + "layer_norm.weight"),
        KeyRule(ours + "self_attention.linear_qkv.weight", tuple(attn + f"{x}.weight" for x in "qkv"), *qkv),
        KeyRule(ours + "self_attention.linear_proj.weight", attn + "o.weight"),
    ]


def _mlp_rules(ours: str, hf: str, gated: bool) -> list[KeyRule | Alias]:
    """Pre-norm MLP sublayer ``hf`` of one block: ``wi`` (or gated ``[wi_0; wi_1]``) and ``wo``."""
    mlp = hf + "DenseReluDense."
    fc1 = (KeyRule(ours + "mlp.linear_fc1.weight", (mlp + "wi_0.weight", mlp + "wi_1.weight"), *GATED_FC1)
           if gated else KeyRule(ours + "mlp.linear_fc1.weight", mlp + "wi.weight"))
    return [
        KeyRule(ours + "pre_mlp_layernorm.weight", hf + "layer_norm.weight"),
        fc1,
        KeyRule(ours + "mlp.linear_fc2.weight", mlp + "wo.weight"),
    ]
