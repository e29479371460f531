"""BERT (Hugging Face ``BertForPreTraining`` / ``BertForMaskedLM``) <-> our ``BertModel`` with the local BERT spec.

Mapping: post-norm LayerNorm layers (``layernorm_position="post"``) with the embedding norm,
biases everywhere, learned absolute positions, token types (``type_vocab_size`` ->
``num_tokentypes``), separate ``query``/``key``/``value`` -> our per-head fused ``linear_qkv``, the
MLM transform (``cls.predictions.transform`` -> ``lm_head``), the MLM decoder bias
(``cls.predictions.bias`` -> ``output_layer.bias``), the pooler and the NSP head
(``cls.seq_relationship`` -> ``binary_head``). ``BertForMaskedLM`` has neither pooler nor NSP head:
it maps to ``add_binary_head=False``, and ``to_hf`` builds whichever class the model's heads match
(recorded in the config's ``architectures``).

Untied decoders (``tie_word_embeddings=False``): Hugging Face then keeps ``cls.predictions.bias``
as a separate parameter that its forward never reads (the decoder's own bias is used); ``to_hf``
writes the decoder bias into it.

Hugging Face's ``pad_token_id`` only zeroes that row's gradient (``padding_idx``); our embedding
trains every row, which changes training, not the converted model's outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import HF_ACTIVATIONS, hf_activation_to_ours, ours_activation_to_hf
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import config_qkv_transforms
from megatron_core.interop.registry import (
    Blueprint,
    HFFamily,
    HFInteropError,
    UnsupportedHFConfigError,
    drop_token_ids_outside_vocab,
)

# (HF suffix under bert.encoder.layer.N., our suffix under encoder.layers.N.), weight and bias each.
_LAYER_PAIRS = (
    ("attention.output.dense", "self_attention.linear_proj"),
    ("attention.output.LayerNorm", "input_layernorm"),
    ("intermediate.dense", "mlp.linear_fc1"),
    ("output.dense", "mlp.linear_fc2"),
    ("output.LayerNorm", "pre_mlp_layernorm"),
)
# (HF key, our key) outside the layers, weight and bias each.
_HEAD_PAIRS = (
    ("bert.embeddings.LayerNorm", "embedding.layernorm"),
    ("cls.predictions.transform.dense", "lm_head.dense"),
    ("cls.predictions.transform.LayerNorm", "lm_head.layer_norm"),
)
_BINARY_PAIRS = (("bert.pooler.dense", "pooler.dense"), ("cls.seq_relationship", "binary_head"))
_CLASS_FOR_BINARY_HEAD = {True: "BertForPreTraining", False: "BertForMaskedLM"}
_EMBEDDINGS = (
    ("bert.embeddings.word_embeddings.weight", "embedding.word_embeddings.weight"),
    ("bert.embeddings.position_embeddings.weight", "embedding.position_embeddings.weight"),
    ("bert.embeddings.token_type_embeddings.weight", "embedding.tokentype_embeddings.weight"),
)


class BertFamily(HFFamily):
    """Converter for ``model_type="bert"`` (``BertForPreTraining``: MLM + NSP heads; ``BertForMaskedLM``)."""

    model_type = "bert"
    hf_model_classes = ("BertForPreTraining", "BertForMaskedLM")

    # ------------------------------------------------------------------ configs
    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        """BertConfig -> blueprint; refuses decoder/cross-attention BERTs and relative positions."""
        c = hf_config
        for name in ("is_decoder", "add_cross_attention"):
            if getattr(c, name, False):
                raise UnsupportedHFConfigError(
                    "bert", name, True, "our BertModel is a bidirectional encoder without cross-attention",
                    f"convert a BERT with {name}=False",
                )
        position_type = getattr(c, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedHFConfigError(
                "bert", "position_embedding_type", position_type, "only learned absolute positions are implemented",
                "use position_embedding_type='absolute'",
            )
        config = TransformerConfig(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_attention_heads=c.num_attention_heads,
            ffn_hidden_size=c.intermediate_size,
            hidden_dropout=c.hidden_dropout_prob,
            attention_dropout=c.attention_probs_dropout_prob,
            layernorm_epsilon=c.layer_norm_eps,
            normalization="LayerNorm",
            layernorm_position="post",
            add_bias_linear=True,
            activation_func=hf_activation_to_ours("bert", "hidden_act", c.hidden_act),
            init_method_std=c.initializer_range,
            use_scaled_init_method=False,
        )
        return Blueprint("bert", config, {
            "vocab_size": c.vocab_size,
            "max_sequence_length": c.max_position_embeddings,
            "num_tokentypes": c.type_vocab_size,
            "add_binary_head": True,
            "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
        })

    def blueprint_from_hf_model(self, hf_model: Any) -> Blueprint:
        """The config's blueprint, with the heads the model really has (NSP or not, decoder tied or not)."""
        blueprint = self.blueprint_from_hf(hf_model.config)
        blueprint.model_kwargs["add_binary_head"] = hasattr(hf_model.cls, "seq_relationship")
        decoder = hf_model.cls.predictions.decoder.weight
        blueprint.model_kwargs["share_embeddings_and_output_weights"] = (
            decoder is hf_model.bert.embeddings.word_embeddings.weight
        )
        return blueprint

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg, kw = blueprint.config, blueprint.model_kwargs
        assert cfg.kv_channels is not None
        checks = [
            (cfg.layernorm_position == "post", "layernorm_position='pre' (Hugging Face BERT is post-norm)"),
            (cfg.normalization == "LayerNorm", f"normalization={cfg.normalization!r} (BERT has LayerNorm)"),
            (not cfg.gated_linear_unit, f"gated MLP activation_func={cfg.activation_func!r}"),
            (cfg.activation_func in set(HF_ACTIVATIONS.values()), f"activation_func={cfg.activation_func!r}"),
            (cfg.add_bias_linear, "add_bias_linear=False (BERT has biases on every linear)"),
            (cfg.num_query_groups == cfg.num_attention_heads, "grouped-query attention (BERT is MHA)"),
            (cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size,
             f"kv_channels={cfg.kv_channels} * heads != hidden_size={cfg.hidden_size}"),
            (cfg.softmax_scale is None, f"softmax_scale={cfg.softmax_scale} (BERT: 1/sqrt(head_dim))"),
            (not cfg.qk_layernorm and not cfg.layernorm_zero_centered_gamma, "qk_layernorm / zero-centred gamma"),
            (kw["num_tokentypes"] > 0, "num_tokentypes=0 (BERT has token-type embeddings)"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "BERT cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import BertConfig

        cfg, kw = blueprint.config, blueprint.model_kwargs
        base = template.to_dict() if template is not None else {}
        base.update(
            vocab_size=kw["vocab_size"],
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_hidden_size,
            hidden_act=ours_activation_to_hf(cfg.activation_func, base.get("hidden_act"), "gelu"),
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=kw["max_sequence_length"],
            type_vocab_size=kw["num_tokentypes"],
            initializer_range=cfg.init_method_std,
            layer_norm_eps=cfg.layernorm_epsilon,
            is_decoder=False,
            add_cross_attention=False,
            tie_word_embeddings=kw["share_embeddings_and_output_weights"],
            architectures=[_CLASS_FOR_BINARY_HEAD[bool(kw["add_binary_head"])]],
        )
        if template is None:
            drop_token_ids_outside_vocab(base, kw["vocab_size"], names=("pad_token_id",), default=0)
        return BertConfig.from_dict(base)

    # ------------------------------------------------------------------ models
    def build_model(self, blueprint: Blueprint, spec: Any | None = None) -> torch.nn.Module:
        """A ``BertModel`` (TP=1) for ``blueprint``, from ``spec`` or the local BERT spec."""
        from megatron_core.models.bert import BertModel
        from specs.bert import get_bert_layer_local_spec

        return BertModel(blueprint.config, spec if spec is not None else get_bert_layer_local_spec(),
                         **blueprint.model_kwargs)

    def blueprint_of(self, model: torch.nn.Module) -> Blueprint:
        from megatron_core.models.bert import BertModel

        if not isinstance(model, BertModel):
            raise HFInteropError(f"bert: expected a megatron_core BertModel, got {type(model).__name__}")
        return Blueprint("bert", model.config, {
            "vocab_size": model.vocab_size,
            "max_sequence_length": model.max_sequence_length,
            "num_tokentypes": model.num_tokentypes,
            "add_binary_head": model.add_binary_head,
            "share_embeddings_and_output_weights": model.share_embeddings_and_output_weights,
        })

    def build_hf_model(self, hf_config: Any, **kwargs: Any) -> torch.nn.Module:
        import transformers

        architectures = getattr(hf_config, "architectures", None) or [_CLASS_FOR_BINARY_HEAD[True]]
        name = architectures[0] if architectures[0] in self.hf_model_classes else _CLASS_FOR_BINARY_HEAD[True]
        return getattr(transformers, name)._from_config(hf_config, **kwargs)

    # ------------------------------------------------------------------ state dicts
    def key_table(self, blueprint: Blueprint) -> KeyTable:
        """BERT's keys: separate ``query``/``key``/``value`` -> per-head ``linear_qkv``, heads by name."""
        kw = blueprint.model_kwargs
        ours, hf = "encoder.layers.{layer}.", "bert.encoder.layer.{layer}."
        pairs = _HEAD_PAIRS + (_BINARY_PAIRS if kw["add_binary_head"] else ())
        rules: list[KeyRule | Alias] = [
            *(KeyRule(our_key, hf_key) for hf_key, our_key in _EMBEDDINGS),
            *(KeyRule(our_name + ".{p}", hf_name + ".{p}") for hf_name, our_name in pairs),
            KeyRule(ours + "self_attention.linear_qkv.{p}",
                    tuple(hf + f"attention.self.{x}.{{p}}" for x in ("query", "key", "value")),
                    *config_qkv_transforms(blueprint.config)),
            *(KeyRule(ours + our_name + ".{p}", hf + hf_name + ".{p}") for hf_name, our_name in _LAYER_PAIRS),
        ]
        if kw["share_embeddings_and_output_weights"]:
            # One bias parameter under both names; the decoder weight is the word table.
            rules += [
                Alias("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", check=True),
                KeyRule("output_layer.bias", "cls.predictions.bias"),
                Alias("cls.predictions.decoder.bias", "cls.predictions.bias"),
            ]
        else:
            # The decoder's bias is the one Hugging Face's forward adds; cls.predictions.bias is unread.
            rules += [
                KeyRule("output_layer.weight", "cls.predictions.decoder.weight"),
                KeyRule("output_layer.bias", "cls.predictions.decoder.bias"),
                Alias("cls.predictions.bias", "cls.predictions.decoder.bias"),
            ]
        placeholders: dict[str, int | tuple[str, ...]] = {"layer": blueprint.config.num_layers, "p": ("weight", "bias")}
        return KeyTable("bert", rules, placeholders, hf_ignore=("position_ids", "token_type_ids"))
