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
from collections.abc import Mapping
from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import HF_ACTIVATIONS, hf_activation_to_ours, ours_activation_to_hf
from megatron_core.interop.layouts import fuse_gated_fc1, fuse_qkv, split_gated_fc1, split_qkv
from megatron_core.interop.registry import (
    Blueprint,
    HFFamily,
    HFInteropError,
    KeyTaker,
    StateDict,
    UnsupportedHFConfigError,
)

_MAX_SEQUENCE_LENGTH = 512  # T5 has no position table; only learned positions would read this.


def fuse_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Separate ``k``/``v`` ``[heads * d, h]`` -> cross-attention ``linear_kv`` rows ``[k_0; v_0; k_1; v_1; ...]``."""
    tail = k.shape[1:]
    pairs = torch.stack([k.reshape(num_heads, head_dim, *tail), v.reshape(num_heads, head_dim, *tail)], dim=1)
    return pairs.reshape(2 * num_heads * head_dim, *tail).contiguous()  # [heads, 2, d, h] -> [2*heads*d, h]


def split_kv(kv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_kv`."""
    tail = kv.shape[1:]
    pairs = kv.reshape(num_heads, 2, head_dim, *tail)
    return (pairs[:, 0].reshape(num_heads * head_dim, *tail).contiguous(),
            pairs[:, 1].reshape(num_heads * head_dim, *tail).contiguous())


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
    @staticmethod
    def _heads(cfg: TransformerConfig) -> tuple[int, int]:
        assert cfg.kv_channels is not None
        return cfg.num_attention_heads, cfg.kv_channels

    def _mlp_from_hf(self, take: KeyTaker, hf: str, ours: str, gated: bool) -> StateDict:
        fc1 = fuse_gated_fc1(take(hf + "wi_0.weight"), take(hf + "wi_1.weight")) if gated else take(hf + "wi.weight")
        return {ours + "linear_fc1.weight": fc1, ours + "linear_fc2.weight": take(hf + "wo.weight")}

    def _mlp_to_hf(self, take: KeyTaker, ours: str, hf: str, gated: bool) -> StateDict:
        fc1 = take(ours + "linear_fc1.weight")
        out = {hf + "wo.weight": take(ours + "linear_fc2.weight")}
        if gated:
            out[hf + "wi_0.weight"], out[hf + "wi_1.weight"] = split_gated_fc1(fc1)
        else:
            out[hf + "wi.weight"] = fc1
        return out

    def _self_attention_from_hf(self, take: KeyTaker, hf: str, ours: str, cfg: TransformerConfig) -> StateDict:
        heads, dim = self._heads(cfg)
        qkv = fuse_qkv(take(hf + "q.weight"), take(hf + "k.weight"), take(hf + "v.weight"),
                       num_heads=heads, num_groups=heads, head_dim=dim)
        return {ours + "linear_qkv.weight": qkv, ours + "linear_proj.weight": take(hf + "o.weight")}

    def _self_attention_to_hf(self, take: KeyTaker, ours: str, hf: str, cfg: TransformerConfig) -> StateDict:
        heads, dim = self._heads(cfg)
        q, k, v = split_qkv(take(ours + "linear_qkv.weight"), num_heads=heads, num_groups=heads, head_dim=dim)
        return {hf + "q.weight": q, hf + "k.weight": k, hf + "v.weight": v, hf + "o.weight": take(ours + "linear_proj.weight")}

    def state_dict_from_hf(self, hf_state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        gated, (heads, dim) = bool(cfg.gated_linear_unit), self._heads(cfg)
        take = KeyTaker(hf_state_dict, "t5 state dict", ignore=("EncDecAttention.relative_attention_bias.weight",))
        shared = take("shared.weight")
        out: StateDict = {"embedding.word_embeddings.weight": shared}
        for stack in ("encoder", "decoder"):
            if not torch.equal(take(f"{stack}.embed_tokens.weight"), shared):
                raise HFInteropError(f"t5: {stack}.embed_tokens differs from shared; our T5Model has one embedding")
            out[f"{stack}_relative_pos_emb.relative_attention_bias.weight"] = take(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
            out[f"{stack}.final_layernorm.weight"] = take(f"{stack}.final_layer_norm.weight")
        for i in range(kw["encoder_num_layers"]):
            hf, ours = f"encoder.block.{i}.layer.", f"encoder.layers.{i}."
            out[ours + "input_layernorm.weight"] = take(hf + "0.layer_norm.weight")
            out.update(self._self_attention_from_hf(take, hf + "0.SelfAttention.", ours + "self_attention.", cfg))
            out[ours + "pre_mlp_layernorm.weight"] = take(hf + "1.layer_norm.weight")
            out.update(self._mlp_from_hf(take, hf + "1.DenseReluDense.", ours + "mlp.", gated))
        for i in range(cfg.num_layers):
            hf, ours = f"decoder.block.{i}.layer.", f"decoder.layers.{i}."
            out[ours + "input_layernorm.weight"] = take(hf + "0.layer_norm.weight")
            out.update(self._self_attention_from_hf(take, hf + "0.SelfAttention.", ours + "self_attention.", cfg))
            cross = hf + "1.EncDecAttention."
            out[ours + "pre_cross_attn_layernorm.weight"] = take(hf + "1.layer_norm.weight")
            out[ours + "cross_attention.linear_q.weight"] = take(cross + "q.weight")
            out[ours + "cross_attention.linear_kv.weight"] = fuse_kv(take(cross + "k.weight"), take(cross + "v.weight"),
                                                                     heads, dim)
            out[ours + "cross_attention.linear_proj.weight"] = take(cross + "o.weight")
            out[ours + "pre_mlp_layernorm.weight"] = take(hf + "2.layer_norm.weight")
            out.update(self._mlp_from_hf(take, hf + "2.DenseReluDense.", ours + "mlp.", gated))
        head = take("lm_head.weight")
        if not kw["share_embeddings_and_output_weights"]:
            out["output_layer.weight"] = head
        elif not torch.equal(head, shared):
            raise HFInteropError("t5: the blueprint ties lm_head to shared but their weights differ; "
                                 "Fix: convert the model object (from_hf reads the tie from it)")
        take.finish()
        return out

    def state_dict_to_hf(self, state_dict: Mapping[str, torch.Tensor], blueprint: Blueprint) -> StateDict:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        gated, (heads, dim) = bool(cfg.gated_linear_unit), self._heads(cfg)
        take = KeyTaker(state_dict, "our T5 state dict", ignore=("_extra_state",))
        shared = take("embedding.word_embeddings.weight")
        out: StateDict = {"shared.weight": shared}
        for stack in ("encoder", "decoder"):
            out[f"{stack}.embed_tokens.weight"] = shared
            out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = take(
                f"{stack}_relative_pos_emb.relative_attention_bias.weight")
            out[f"{stack}.final_layer_norm.weight"] = take(f"{stack}.final_layernorm.weight")
        for i in range(kw["encoder_num_layers"]):
            hf, ours = f"encoder.block.{i}.layer.", f"encoder.layers.{i}."
            out[hf + "0.layer_norm.weight"] = take(ours + "input_layernorm.weight")
            out.update(self._self_attention_to_hf(take, ours + "self_attention.", hf + "0.SelfAttention.", cfg))
            out[hf + "1.layer_norm.weight"] = take(ours + "pre_mlp_layernorm.weight")
            out.update(self._mlp_to_hf(take, ours + "mlp.", hf + "1.DenseReluDense.", gated))
        for i in range(cfg.num_layers):
            hf, ours = f"decoder.block.{i}.layer.", f"decoder.layers.{i}."
            out[hf + "0.layer_norm.weight"] = take(ours + "input_layernorm.weight")
            out.update(self._self_attention_to_hf(take, ours + "self_attention.", hf + "0.SelfAttention.", cfg))
            cross = hf + "1.EncDecAttention."
            out[hf + "1.layer_norm.weight"] = take(ours + "pre_cross_attn_layernorm.weight")
            out[cross + "q.weight"] = take(ours + "cross_attention.linear_q.weight")
            out[cross + "k.weight"], out[cross + "v.weight"] = split_kv(
                take(ours + "cross_attention.linear_kv.weight"), heads, dim)
            out[cross + "o.weight"] = take(ours + "cross_attention.linear_proj.weight")
            out[hf + "2.layer_norm.weight"] = take(ours + "pre_mlp_layernorm.weight")
            out.update(self._mlp_to_hf(take, ours + "mlp.", hf + "2.DenseReluDense.", gated))
        tied = kw["share_embeddings_and_output_weights"]
        out["lm_head.weight"] = shared if tied else take("output_layer.weight")
        take.finish()
        return out
