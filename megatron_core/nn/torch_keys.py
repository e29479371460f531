"""``torch.nn`` transformer state dicts -> this toolkit's (Megatron-Core) keys and layouts.

The drop-in layers keep Megatron-Core names in ``state_dict()`` (so sharded checkpoints and
resharding work), and convert ``torch.nn`` keys on the way *in*, inside ``load_state_dict``:

=====================================  ==============================================================
torch.nn (per layer)                   ours
=====================================  ==============================================================
self_attn.in_proj_weight ``[3d, d]``   self_attention.linear_qkv.weight, rows regrouped per head
                                       ``[q_h; k_h; v_h]`` (torch stacks ``[q; k; v]``)
self_attn.out_proj                     self_attention.linear_proj
multihead_attn.in_proj_weight          cross_attention.linear_q.weight (``q``) and
                                       cross_attention.linear_kv.weight (``[k_h; v_h]`` per head)
multihead_attn.out_proj                cross_attention.linear_proj
linear1 / linear2                      mlp.linear_fc1 / mlp.linear_fc2
norm1 / norm2 (/ norm3)                input_layernorm / pre_mlp_layernorm (encoder);
                                       input_layernorm / pre_cross_attn_layernorm / pre_mlp_layernorm
                                       (decoder)
norm (TransformerEncoder/Decoder)      final_layernorm
=====================================  ==============================================================

Everything here works on full tensors; the layers cut their TP slices afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

StateDict = dict[str, Any]


def qkv_per_head(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[q; k; v]`` rows (torch) -> ``[q_0; k_0; v_0; q_1; ...]`` per head (ours); weight or bias."""
    rows = tensor.shape[0]
    head_dim = rows // (3 * num_heads)
    # [3, heads, hn, *] -> [heads, 3, hn, *]
    return tensor.reshape(3, num_heads, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def kv_per_head(key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate ``k`` and ``v`` rows -> ``[k_0; v_0; k_1; v_1; ...]`` per head (CrossAttention's linear_kv)."""
    head_dim = key.shape[0] // num_heads
    pair = torch.stack((key.reshape(num_heads, head_dim, *key.shape[1:]),
                        value.reshape(num_heads, head_dim, *value.shape[1:])), dim=1)  # [heads, 2, hn, *]
    return pair.reshape(2 * key.shape[0], *key.shape[1:])


def rename(state_dict: StateDict, old: str, new: str) -> None:
    """Move every key starting with ``old`` to start with ``new`` (in place)."""
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old):]] = state_dict.pop(key)


def convert_self_attention(state_dict: StateDict, src: str, dst: str, num_heads: int) -> None:
    """``src`` = a torch ``MultiheadAttention`` prefix -> ``dst`` = a ``SelfAttention`` prefix (in place)."""
    for suffix in ("weight", "bias"):
        key = f"{src}in_proj_{suffix}"
        if key in state_dict:
            state_dict[f"{dst}linear_qkv.{suffix}"] = qkv_per_head(state_dict.pop(key), num_heads)
    rename(state_dict, f"{src}out_proj.", f"{dst}linear_proj.")


def convert_cross_attention(state_dict: StateDict, src: str, dst: str, num_heads: int) -> None:
    """``src`` = a torch ``MultiheadAttention`` prefix -> ``dst`` = a ``CrossAttention`` prefix (in place)."""
    for suffix in ("weight", "bias"):
        key = f"{src}in_proj_{suffix}"
        if key in state_dict:
            q, k, v = state_dict.pop(key).chunk(3, dim=0)
            state_dict[f"{dst}linear_q.{suffix}"] = q
            state_dict[f"{dst}linear_kv.{suffix}"] = kv_per_head(k, v, num_heads)
    rename(state_dict, f"{src}out_proj.", f"{dst}linear_proj.")


def _has_torch_keys(state_dict: StateDict, prefix: str, names: tuple[str, ...]) -> bool:
    return any(key.startswith(prefix + name) for key in state_dict for name in names)


def convert_encoder_layer(state_dict: StateDict, prefix: str, num_heads: int) -> None:
    """A ``torch.nn.TransformerEncoderLayer``'s keys under ``prefix`` -> ours (no-op for native keys)."""
    if not _has_torch_keys(state_dict, prefix, ("self_attn.", "linear1.", "norm1.")):
        return
    convert_self_attention(state_dict, f"{prefix}self_attn.", f"{prefix}self_attention.", num_heads)
    _convert_mlp_and_norms(state_dict, prefix, {"norm1.": "input_layernorm.", "norm2.": "pre_mlp_layernorm."})


def convert_decoder_layer(state_dict: StateDict, prefix: str, num_heads: int) -> None:
    """A ``torch.nn.TransformerDecoderLayer``'s keys under ``prefix`` -> ours (no-op for native keys)."""
    if not _has_torch_keys(state_dict, prefix, ("self_attn.", "multihead_attn.", "linear1.", "norm1.")):
        return
    convert_self_attention(state_dict, f"{prefix}self_attn.", f"{prefix}self_attention.", num_heads)
    convert_cross_attention(state_dict, f"{prefix}multihead_attn.", f"{prefix}cross_attention.", num_heads)
    _convert_mlp_and_norms(state_dict, prefix, {"norm1.": "input_layernorm.", "norm2.": "pre_cross_attn_layernorm.",
                                                "norm3.": "pre_mlp_layernorm."})


def _convert_mlp_and_norms(state_dict: StateDict, prefix: str, norms: dict[str, str]) -> None:
    rename(state_dict, f"{prefix}linear1.", f"{prefix}mlp.linear_fc1.")
    rename(state_dict, f"{prefix}linear2.", f"{prefix}mlp.linear_fc2.")
    for old, new in norms.items():
        rename(state_dict, prefix + old, prefix + new)


def convert_stack(state_dict: StateDict, prefix: str) -> None:
    """``TransformerEncoder`` / ``TransformerDecoder``: ``norm.*`` -> ``final_layernorm.*``."""
    rename(state_dict, f"{prefix}norm.", f"{prefix}final_layernorm.")
