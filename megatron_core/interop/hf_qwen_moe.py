"""Qwen2-MoE and Qwen3-MoE (Hugging Face) <-> our ``GPTModel`` with the local MoE spec.

Both are Mixtral's tree (``hf_mixtral.py``) with other choices:

* routing: ``norm_topk_prob=False`` (their default) weighs the top-k by the full softmax, which is our
  ``moe_router_pre_softmax=True``; ``norm_topk_prob=True`` renormalises, i.e. Mixtral's routing;
* Qwen2-MoE: q/k/v biases (``add_qkv_bias``), and a shared expert of width
  ``shared_expert_intermediate_size`` gated by ``sigmoid(shared_expert_gate(x))``
  (``moe_shared_expert_gate``: ``mlp.shared_experts.gate_weight [1, h]``);
* Qwen3-MoE: per-head RMSNorm on queries and keys (``q_norm``/``k_norm`` -> ``q_layernorm``/``k_layernorm``).

Dense layers (``mlp_only_layers``, ``decoder_sparse_step > 1``) are refused: every layer must be MoE.
"""

from __future__ import annotations

from typing import Any

from megatron_core.config import TransformerConfig
from megatron_core.interop.hf_llama import LlamaFamily
from megatron_core.interop.hf_mixtral import MoEFamilyMixin, _get
from megatron_core.interop.keymap import Alias, KeyRule
from megatron_core.interop.layouts import GATED_FC1, config_qkv_transforms
from megatron_core.interop.registry import Blueprint


class _QwenMoEFamily(MoEFamilyMixin, LlamaFamily):
    """What Qwen2-MoE and Qwen3-MoE share: routing by ``norm_topk_prob``, all layers sparse."""

    def qwen_fields(self, c: Any) -> dict[str, Any]:
        if list(_get(c, "mlp_only_layers", default=[])) or int(_get(c, "decoder_sparse_step", default=1)) != 1:
            self._refuse("mlp_only_layers", (c.mlp_only_layers, c.decoder_sparse_step),
                         "dense layers between the MoE layers are not converted",
                         "use mlp_only_layers=[] and decoder_sparse_step=1")
        fields = self.common_fields(c, c.moe_intermediate_size)
        norm = bool(c.norm_topk_prob)
        if norm and c.num_experts_per_tok == 1:
            self._refuse("norm_topk_prob", True, "a renormalised top-1 weight is always 1.0, which our top-1 "
                         "softmax router does not compute", "use norm_topk_prob=False for top-1 routing")
        fields["moe_router_pre_softmax"] = not norm
        return fields

    def qwen_checks(self, cfg: TransformerConfig) -> list[tuple[bool, str]]:
        return self.moe_checks(cfg) + [
            (cfg.moe_router_pre_softmax or cfg.moe_router_topk >= 2, "top-1 without moe_router_pre_softmax"),
        ]

    def qwen_hf_fields(self, blueprint: Blueprint, base: dict[str, Any]) -> dict[str, Any]:
        cfg = blueprint.config
        fields = self.common_hf_fields(blueprint, base)
        fields.update(moe_intermediate_size=cfg.moe_ffn_hidden_size, num_experts=cfg.num_moe_experts,
                      norm_topk_prob=not cfg.moe_router_pre_softmax, mlp_only_layers=[], decoder_sparse_step=1,
                      use_sliding_window=False)
        fields.setdefault("intermediate_size", base.get("intermediate_size", cfg.ffn_hidden_size))
        return fields

    def placeholders(self, blueprint: Blueprint) -> dict[str, int | tuple[str, ...]]:
        cfg = blueprint.config
        assert cfg.num_moe_experts is not None
        return {"layer": cfg.num_layers, "p": ("weight",), "expert": cfg.num_moe_experts}


class Qwen2MoeFamily(_QwenMoEFamily):
    """Converter for ``model_type="qwen2_moe"`` (gated shared expert, q/k/v biases)."""

    model_type = "qwen2_moe"
    hf_model_classes = ("Qwen2MoeForCausalLM",)
    spec_factory = "specs.mixtral:get_mixtral_layer_local_spec"

    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        c = hf_config
        fields = self.qwen_fields(c)
        shared = int(c.shared_expert_intermediate_size or 0)
        if shared <= 0:
            self._refuse("shared_expert_intermediate_size", shared, "Qwen2-MoE always builds its shared expert",
                         "set shared_expert_intermediate_size > 0")
        fields.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True,
                      add_qkv_bias=bool(_get(c, "qkv_bias", default=True)))
        return Blueprint(self.model_type, TransformerConfig(**fields), self.model_kwargs(c))

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg = blueprint.config
        checks = self.qwen_checks(cfg) + [
            (cfg.moe_shared_expert_intermediate_size is not None and cfg.moe_shared_expert_gate,
             "no gated shared expert (Qwen2-MoE has one)"),
            (not cfg.qk_layernorm, "qk_layernorm=True"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "Qwen2-MoE cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import Qwen2MoeConfig

        base = template.to_dict() if template is not None else {}
        base.update(self.qwen_hf_fields(blueprint, base))
        base.update(shared_expert_intermediate_size=blueprint.config.moe_shared_expert_intermediate_size,
                    qkv_bias=blueprint.config.add_qkv_bias)
        return Qwen2MoeConfig.from_dict(base)

    def mlp_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        ours, hf = self.OURS_LAYER + "mlp.shared_experts.", self.HF_LAYER + "mlp."
        return self.moe_rules() + [
            KeyRule(ours + "linear_fc1.weight", (hf + "shared_expert.gate_proj.weight",
                                                 hf + "shared_expert.up_proj.weight"), *GATED_FC1),
            KeyRule(ours + "linear_fc2.weight", hf + "shared_expert.down_proj.weight"),
            KeyRule(ours + "gate_weight", hf + "shared_expert_gate.weight"),
        ]

    def attention_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        """Llama's attention, plus the q/k/v biases (no bias on ``o_proj``)."""
        rules = super().attention_rules(blueprint)
        if blueprint.config.add_qkv_bias:
            rules.append(KeyRule(self.OURS_LAYER + "self_attention.linear_qkv.bias",
                                 tuple(self.HF_LAYER + f"self_attn.{x}_proj.bias" for x in "qkv"),
                                 *config_qkv_transforms(blueprint.config)))
        return rules


class Qwen3MoeFamily(_QwenMoEFamily):
    """Converter for ``model_type="qwen3_moe"`` (q/k RMSNorm, no shared expert)."""

    model_type = "qwen3_moe"
    hf_model_classes = ("Qwen3MoeForCausalLM",)
    spec_factory = "specs.mixtral:get_qwen3_moe_layer_local_spec"

    def blueprint_from_hf(self, hf_config: Any) -> Blueprint:
        c = hf_config
        if _get(c, "attention_bias", default=False):
            self._refuse("attention_bias", True, "biases on q/k/v/o without biases in the experts are not "
                         "representable (our add_bias_linear covers every linear)", "set attention_bias=False")
        fields = self.qwen_fields(c)
        fields.update(qk_layernorm=True)
        return Blueprint(self.model_type, TransformerConfig(**fields), self.model_kwargs(c))

    def unsupported_reason(self, blueprint: Blueprint) -> str | None:
        cfg = blueprint.config
        checks = self.qwen_checks(cfg) + [
            (cfg.qk_layernorm, "qk_layernorm=False (Qwen3-MoE normalises q and k)"),
            (cfg.moe_shared_expert_intermediate_size is None, "a shared expert (Qwen3-MoE has none)"),
            (not cfg.add_qkv_bias, "add_qkv_bias=True"),
        ]
        failed = [why for ok, why in checks if not ok]
        return None if not failed else "Qwen3-MoE cannot represent: " + "; ".join(failed)

    def hf_config_from(self, blueprint: Blueprint, template: Any | None = None) -> Any:
        from transformers import Qwen3MoeConfig

        base = template.to_dict() if template is not None else {}
        base.update(self.qwen_hf_fields(blueprint, base))
        base.update(attention_bias=False)
        return Qwen3MoeConfig.from_dict(base)

    def mlp_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        del blueprint
        return self.moe_rules()

    def attention_rules(self, blueprint: Blueprint) -> list[KeyRule | Alias]:
        """Llama's attention, plus the per-head q/k RMSNorms."""
        ours, hf = self.OURS_LAYER + "self_attention.", self.HF_LAYER + "self_attn."
        return super().attention_rules(blueprint) + [KeyRule(ours + "q_layernorm.weight", hf + "q_norm.weight"),
                                                     KeyRule(ours + "k_layernorm.weight", hf + "k_norm.weight")]
