"""Validation and derived values of the mixture-of-experts fields of ``TransformerConfig``.

Kept apart from ``config.py`` so that the dense config reads on one screen. Every check raises a
``ValueError`` naming the field, its value, why it is wrong and the fix. The world-size check
(``TP x EP x PP`` must lay out the launched processes) happens in
``parallel_state.initialize_model_parallel``, the first place that knows the world size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_core.config import TransformerConfig

# Fields that only make sense with experts: (name, default).
_MOE_ONLY_FIELDS: tuple[tuple[str, Any], ...] = (
    ("moe_ffn_hidden_size", None),
    ("moe_shared_expert_intermediate_size", None),
    ("moe_shared_expert_gate", False),
    ("moe_expert_capacity_factor", None),
    ("moe_grouped_gemm", False),
    ("expert_model_parallel_size", 1),
)


def _fail(field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {why}. Fix: {fix}")


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Which of the ``num_layers`` layers (global index) hold an MoE MLP.

    ``moe_layer_freq`` is Megatron-Core's: an int ``N`` makes every N-th layer (0, N, 2N, ...) an MoE
    layer; a list of 0/1 of length ``num_layers`` names them one by one. Without experts: all False.
    """
    if config.num_moe_experts is None:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(v) for v in freq]


def validate_moe(config: TransformerConfig) -> None:
    """Check the MoE fields of ``config`` and fill ``moe_ffn_hidden_size`` (default: ``ffn_hidden_size``)."""
    ep = config.expert_model_parallel_size
    if ep < 1:
        raise _fail("expert_model_parallel_size", ep, "must be a positive integer", "set it to 1 or more")
    experts = config.num_moe_experts
    if experts is None:
        for name, default in _MOE_ONLY_FIELDS:
            value = getattr(config, name)
            if value != default:
                raise _fail(name, value, "is a mixture-of-experts setting but num_moe_experts is not set",
                            f"set num_moe_experts, or leave {name} at {default!r}")
        return
    if experts < 1:
        raise _fail("num_moe_experts", experts, "must be a positive integer", "set num_moe_experts >= 1 or None")
    if experts % ep != 0:
        raise _fail("num_moe_experts", experts,
                    f"not divisible by expert_model_parallel_size={ep}: each expert-parallel rank holds the "
                    "same number of experts", f"use an expert_model_parallel_size that divides {experts}")
    _validate_router(config, experts)
    _validate_sizes(config)
    _validate_layer_freq(config)


def _validate_router(config: TransformerConfig, experts: int) -> None:
    k = config.moe_router_topk
    if not 1 <= k <= experts:
        raise _fail("moe_router_topk", k, f"must lie in [1, num_moe_experts={experts}]",
                    f"route each token to between 1 and {experts} experts")
    if k == 1 and config.moe_router_score_function == "softmax" and not config.moe_router_pre_softmax:
        raise _fail("moe_router_pre_softmax", False,
                    "with moe_router_topk=1 a softmax over the single chosen logit is always 1 (the router "
                    "would get no gradient)", "set moe_router_pre_softmax=True for top-1 softmax routing")
    if config.moe_router_pre_softmax and config.moe_router_score_function != "softmax":
        raise _fail("moe_router_pre_softmax", True, "only applies to moe_router_score_function='softmax'",
                    "set moe_router_pre_softmax=False or moe_router_score_function='softmax'")
    scale = config.moe_router_topk_scaling_factor
    if scale is not None and scale <= 0:
        raise _fail("moe_router_topk_scaling_factor", scale, "must be > 0", "leave it None or set e.g. 1.0")
    if config.moe_aux_loss_coeff < 0:
        raise _fail("moe_aux_loss_coeff", config.moe_aux_loss_coeff, "must be >= 0", "use e.g. 1e-2 or 0")
    if config.moe_z_loss_coeff is not None and config.moe_z_loss_coeff < 0:
        raise _fail("moe_z_loss_coeff", config.moe_z_loss_coeff, "must be >= 0", "use e.g. 1e-3 or None")
    capacity = config.moe_expert_capacity_factor
    if capacity is not None and capacity <= 0:
        raise _fail("moe_expert_capacity_factor", capacity, "must be > 0",
                    "leave it None (dropless) or set e.g. 1.0")


def _validate_sizes(config: TransformerConfig) -> None:
    tp = config.tensor_model_parallel_size
    if config.moe_ffn_hidden_size is None:
        config.moe_ffn_hidden_size = config.ffn_hidden_size
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        value = getattr(config, name)
        if value is None:
            continue
        if value <= 0:
            raise _fail(name, value, "must be a positive integer", f"set {name} >= 1")
        if value % tp != 0:
            raise _fail(name, value, f"not divisible by tensor_model_parallel_size={tp} (experts are split over TP)",
                        f"use a multiple of {tp}")
    if config.moe_shared_expert_gate and config.moe_shared_expert_intermediate_size is None:
        raise _fail("moe_shared_expert_gate", True, "there is no shared expert to gate",
                    "set moe_shared_expert_intermediate_size, or moe_shared_expert_gate=False")


def _validate_layer_freq(config: TransformerConfig) -> None:
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        if freq < 1:
            raise _fail("moe_layer_freq", freq, "must be >= 1 (every freq-th layer is MoE)",
                        "use 1 for every layer, or a 0/1 list of length num_layers")
        return
    if len(freq) != config.num_layers or any(v not in (0, 1) for v in freq):
        raise _fail("moe_layer_freq", freq,
                    f"a pattern must be a list of 0/1 of length num_layers={config.num_layers}",
                    "give one 0 (dense) or 1 (MoE) per layer, or an int frequency")
