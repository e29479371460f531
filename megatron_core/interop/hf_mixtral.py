"""Mixtral (Hugging Face ``MixtralForCausalLM``) <-> our ``GPTModel`` with the local Mixtral spec.

Attention, norms, embeddings and head are Llama's (:class:`LlamaFamily`'s rules). The MLP is an MoE
layer: ``mlp.gate`` -> ``mlp.router``; transformers 5 stores all experts of a layer as two stacked
tensors, ``experts.gate_up_proj [E, 2f, h]`` (gate rows, then up rows: our ``linear_fc1`` layout) and
``experts.down_proj [E, h, f]`` (our ``linear_fc2``), which unstack into
``mlp.experts.local_experts.{e}.linear_fc1/linear_fc2.weight``.

Routing: Mixtral takes softmax over all experts, its top-k, and renormalises: our softmax router
without pre-softmax (softmax over the top-k logits) computes the same weights. Top-1 Mixtral
(weight always 1) has no counterpart (our top-1 softmax router needs ``moe_router_pre_softmax``).
:class:`MoEFamilyMixin` holds what Qwen2-MoE / Qwen3-MoE share (``hf_qwen_moe.py``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from megatron_core.config import TransformerConfig
from megatron_core.interop.gpt_family import hf_activation_to_ours
from megatron_core.interop.hf_llama import LlamaFamily, _rope_theta
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import GATED_FC1, unstack_transforms
from megatron_core.interop.registry import Blueprint, UnsupportedHFConfigError


def _get(hf_config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config has (field names moved between transformers versions)."""
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default


class MoEFamilyMixin:
    """Config and key-table pieces shared by the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    model_type: ClassVar[str]
    OURS_LAYER: ClassVar[str]
    HF_LAYER: ClassVar[str]

    def _refuse(self, field: str, value: Any, why: str, fix: str) -> None:
        raise UnsupportedHFConfigError(self.model_type, field, value, why, fix)

    def common_fields(self, c: Any, expert_size: int) -> dict[str, Any]:
        """``TransformerConfig`` fields every MoE family reads the same way."""
        act = hf_activation_to_ours(self.model_type, "hidden_act", c.hidden_act)
        if act != "silu":
            self._refuse("hidden_act", c.hidden_act, "the experts are SwiGLU MLPs here", "use hidden_act='silu'")
        if _get(c, "use_sliding_window", default=False) or (
                self.model_type == "mixtral" and c.sliding_window is not None):
            self._refuse("sliding_window", c.sliding_window, "sliding-window attention is not implemented",
                         "set sliding_window=None / use_sliding_window=False")
        return dict(
            num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
            num_query_groups=c.num_key_value_heads, kv_channels=_get(c, "head_dim"),
            ffn_hidden_size=expert_size, moe_ffn_hidden_size=expert_size,
            hidden_dropout=0.0, attention_dropout=float(c.attention_dropout),
            layernorm_epsilon=c.rms_norm_eps, normalization="RMSNorm", add_bias_linear=False,
            activation_func="swiglu", init_method_std=c.initializer_range, use_scaled_init_method=False,
            num_moe_experts=_get(c, "num_local_experts", "num_experts"), moe_router_topk=c.num_experts_per_tok,
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=float(c.router_aux_loss_coef),
        )

    def model_kwargs(self, c: Any) -> dict[str, Any]:
        return {
            "vocab_size": c.vocab_size, "max_sequence_length": c.max_position_embeddings,
            "position_embedding_type": "rope", "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
            "rotary_percent": 1.0, "rotary_base": _rope_theta(c),
        }

    def common_hf_fields(self, blueprint: Blueprint, base: dict[str, Any]) -> dict[str, Any]:
        """The Hugging Face config fields every MoE family writes the same way."""
        cfg, kw = blueprint.config, blueprint.model_kwargs
        rope = dict(base.get("rope_parameters") or {})
        rope.update(rope_type="default", rope_theta=float(kw["rotary_base"]))
        return dict(
            vocab_size=kw["vocab_size"], max_position_embeddings=kw["max_sequence_length"],
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.kv_channels, hidden_act="silu", rms_norm_eps=cfg.layernorm_epsilon,
            initializer_range=cfg.init_method_std, attention_dropout=cfg.attention_dropout,
            rope_parameters=rope, tie_word_embeddings=kw["share_embeddings_and_output_weights"],
            num_experts_per_tok=cfg.moe_router_topk, router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        )

    def moe_checks(self, cfg: TransformerConfig) -> list[tuple[bool, str]]:
        """Conditions every MoE family needs of our config: (holds, what it says when it does not)."""
        return [
            (cfg.num_moe_experts is not None, "no experts (num_moe_experts=None: a dense model)"),
            (cfg.moe_layer_freq == 1, f"moe_layer_freq={cfg.moe_layer_freq} (every layer must be MoE)"),
            (cfg.moe_router_score_function == "softmax", "moe_router_score_function='sigmoid'"),
            (cfg.moe_router_topk_scaling_factor is None, "moe_router_topk_scaling_factor set"),
            (cfg.moe_expert_capacity_factor is None, "moe_expert_capacity_factor set (tokens dropped)"),
            (cfg.activation_func == "swiglu", f"activation_func={cfg.activation_func!r} (experts: swiglu)"),
            (cfg.normalization == "RMSNorm", f"normalization={cfg.normalization!r}"),
            (not cfg.add_bias_linear, "add_bias_linear=True"),
            (cfg.layernorm_position == "pre" and not cfg.layernorm_zero_centered_gamma, "post-norm / zero-centred"),
        ]

    #: How ``save_pretrained`` lays the experts out on disk (transformers 5 stacks them only in memory):
    #: the layer's MoE prefix and each expert's gate, up and down projection names.
    FILE_EXPERTS: ClassVar[tuple[str, str, str, str]] = ("mlp.", "gate_proj", "up_proj", "down_proj")
    _file_layout: bool = False

    def file_key_table(self, blueprint: Blueprint) -> KeyTable:
        """The key table of the files: one ``experts.{e}.<gate/up/down>.weight`` per expert (see ``FILE_EXPERTS``).

        Used by ``import-hf`` / ``export-hf`` (``interop.hf_dir.file_key_table``).
        """
        twin = copy.copy(self)
        twin._file_layout = True
        return twin.key_table(blueprint)  # type: ignore[attr-defined]

    def moe_rules(self) -> list[KeyRule | Alias]:
        """Router and experts of one layer (stacked in memory, one per expert in files)."""
        ours = self.OURS_LAYER + "mlp."
        if self._file_layout:
            prefix, gate, up, down = self.FILE_EXPERTS
            hf = self.HF_LAYER + prefix
            expert = hf + "experts.{expert}."
            return [
                KeyRule(ours + "router.weight", hf + "gate.weight"),
                KeyRule(ours + "experts.local_experts.{expert}.linear_fc1.weight",
                        (expert + gate + ".weight", expert + up + ".weight"), *GATED_FC1),
                KeyRule(ours + "experts.local_experts.{expert}.linear_fc2.weight", expert + down + ".weight"),
            ]
        hf = self.HF_LAYER + "mlp."
        return [
            KeyRule(ours + "router.weight", hf + "gate.weight"),
            KeyRule(ours + "experts.local_experts.{expert}.linear_fc1.weight", hf + "experts.gate_up_proj",
                    *unstack_transforms()),
            KeyRule(ours + "experts.local_experts.{expert}.linear_fc2.weight", hf + "experts.down_proj",
                    *unstack_transforms()),
        ]


class MixtralFamily(MoEFamilyMixin, LlamaFamily):
    """Converter for ``model_type="mixtral"``."""

    model_type = "mixtral"
    hf_model_classes = ("MixtralForCausalLM",)
    FILE_EXPERTS = ("block_sparse_moe.", "w1", "w3", "w2")
    spec_factory = "specs.mixtral:get_mixtral_layer_local_spec"

    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        c = hf_config
        if c.num_experts_per_tok == 1:
            self._refuse("num_experts_per_tok", 1, "Mixtral's top-1 weight is always 1.0; our top-1 softmax router "
                         "weighs by the full softmax", "use num_experts_per_tok >= 2")
        if float(getattr(c, "router_jitter_noise", 0.0) or 0.0) != 0.0:
            self._refuse("router_jitter_noise", c.router_jitter_noise, "router jitter is not implemented",
                         "set router_jitter_noise=0.0")
        config = TransformerConfig(**self.common_fields(c, c.intermediate_size))
        return Blueprint(self.model_type, config, self.model_kwargs(c))

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg = blueprint.config
        checks = self.moe_checks(cfg) + [
            (not cfg.moe_router_pre_softmax, "moe_router_pre_softmax=True (Mixtral renormalises the top-k)"),
            (cfg.moe_router_topk >= 2, "moe_router_topk=1"),
            (cfg.moe_shared_expert_intermediate_size is None, "a shared expert (Mixtral has none)"),
            (not cfg.qk_layernorm and not cfg.add_qkv_bias, "qk_layernorm / add_qkv_bias"),
            (blueprint.model_kwargs.get("position_embedding_type") == "rope", "no RoPE"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "Mixtral cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import MixtralConfig

        base = template.to_dict() if template is not None else {}
        base.update(self.common_hf_fields(blueprint, base))
        cfg = blueprint.config
        base.update(intermediate_size=cfg.moe_ffn_hidden_size, num_local_experts=cfg.num_moe_experts,
                    sliding_window=None, router_jitter_noise=0.0)
        return MixtralConfig.from_dict(base)

    def mlp_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        del blueprint
        return self.moe_rules()

    def placeholders(self, blueprint: Blueprint) -> dict[str, int | tuple[str, ...]]:
        cfg = blueprint.config
        assert cfg.num_moe_experts is not None
        return {"layer": cfg.num_layers, "p": ("weight",), "expert": cfg.num_moe_experts}

