"""A model description from Megatron-LM's stored arguments (``common["args"]`` of its checkpoints).

Megatron-LM saves its parsed command line (an ``argparse.Namespace``) with every checkpoint; its
``core_transformer_config_from_args`` copies every argument named like a ``TransformerConfig``
field, and translates a few (``--swiglu``, ``--norm-epsilon``, ``--num-experts``, ...). This does the
same for the fields our ``TransformerConfig`` has, and picks the layer spec (the local GPT layer,
with MoE experts when ``num_experts`` is set; one spec per layer when ``--moe-layer-freq`` mixes dense
and MoE layers).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.description import ModelDescription

#: Megatron-LM arguments copied to the TransformerConfig field of the same name (model structure only: the
#: rest of ``args`` is training, parallelism and kernel choices, which the checkpoint's weights do not depend on).
_COPIED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels", "normalization",
           "add_bias_linear", "add_qkv_bias", "qk_layernorm", "apply_residual_connection_post_layernorm",
           "init_method_std", "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_topk",
           "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
           "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_expert_capacity_factor",
           "moe_token_drop_policy", "moe_token_dispatcher_type", "moe_grouped_gemm",
           "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")
#: Megatron-LM argument -> our TransformerConfig field, where the names differ.
_RENAMED = {"norm_epsilon": "layernorm_epsilon", "num_experts": "num_moe_experts"}


def _plain(value: Any) -> Any:
    """A JSON-able value: one-element lists (``nargs='+'`` arguments) unwrapped, dtypes named."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def _config_fields(args: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in (*_COPIED, *_RENAMED):
        field = _RENAMED.get(name, name)
        if field in TransformerConfig.model_fields and args.get(name) is not None:
            config[field] = _plain(args[name])
    gated = bool(args.get("swiglu"))
    config.update(
        num_query_groups=args.get("num_query_groups") if args.get("group_query_attention") else None,
        activation_func="swiglu" if gated else ("squared_relu" if args.get("squared_relu") else "gelu"),
        hidden_dropout=0.0, attention_dropout=0.0)
    dtype = args.get("params_dtype")
    if isinstance(dtype, torch.dtype):
        config["params_dtype"] = _plain(dtype)
    elif args.get("bf16") or args.get("fp16"):
        config["params_dtype"] = "bfloat16" if args.get("bf16") else "float16"
    if not config.get("num_moe_experts"):
        config = {k: v for k, v in config.items() if not k.startswith("moe_")}
    return {k: v for k, v in config.items() if v is not None}


def description_from_args(args: dict[str, Any], vocab_size: int) -> ModelDescription:
    """A description from Megatron-LM's stored arguments (``vars(common["args"])``).

    Args:
        args: the arguments as a dict.
        vocab_size: the stored embedding's rows (Megatron-LM pads the tokenizer's vocabulary).
    """
    config = _config_fields(args)
    experts = config.get("num_moe_experts")
    spec = "specs.gpt.get_gpt_layer_local_spec"
    spec_args: dict[str, Any] = {"qk_layernorm": bool(config.get("qk_layernorm", False))}
    if experts and config.get("moe_layer_freq", 1) != 1:  # dense and MoE layers mixed: one spec per layer
        spec = "specs.gpt.get_gpt_decoder_block_spec"
    elif experts:
        spec_args.update(num_experts=experts, moe_grouped_gemm=bool(config.get("moe_grouped_gemm", False)))
    position = args.get("position_embedding_type", "learned_absolute")
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size, "max_sequence_length": args.get("max_position_embeddings") or args["seq_length"],
        "position_embedding_type": position,
        "share_embeddings_and_output_weights": not args.get("untie_embeddings_and_output_weights", False),
    }
    if position == "rope":
        kwargs.update(rotary_base=args.get("rotary_base", 10000), rotary_percent=args.get("rotary_percent", 1.0))
    return ModelDescription(config=config, spec=spec, spec_args=spec_args,
                            model_kwargs=kwargs)
