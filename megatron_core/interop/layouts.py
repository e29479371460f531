"""Weight layout conversions shared by the Hugging Face family converters.

Megatron-Core fuses the attention input projection into one ``linear_qkv`` matrix laid out *per
query group*: for each group g, the rows of its ``heads // groups`` query heads, then its key head,
then its value head (``kv_channels`` rows each). Hugging Face models keep separate q/k/v blocks
(``q_proj``/``k_proj``/``v_proj``, or GPT-2's concatenated ``[q; k; v]``). Gated MLPs keep
``linear_fc1 = [gate; up]``. These functions move between the two, exactly (pure reindexing, no
arithmetic), so a round trip returns bit-identical tensors.
"""

from __future__ import annotations

import torch


def _check_rows(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.shape[0] != rows:
        raise ValueError(
            f"{name}: expected {rows} rows (dim 0), found shape {tuple(tensor.shape)}. "
            "Fix: check num_attention_heads / num_query_groups / kv_channels against the weights."
        )


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_groups: int, head_dim: int
) -> torch.Tensor:
    """Fuse separate q, k, v projections into Megatron-Core's per-query-group ``linear_qkv`` layout.

    Works for weights (``[rows, in]``) and biases (``[rows]``).

    Args:
        q: ``[num_heads * head_dim, ...]`` query rows, head after head.
        k: ``[num_groups * head_dim, ...]`` key rows, head after head.
        v: ``[num_groups * head_dim, ...]`` value rows, head after head.
        num_heads: number of query heads.
        num_groups: number of key/value heads (query groups).
        head_dim: rows per head (kv_channels).

    Returns:
        ``[num_groups * (heads_per_group + 2) * head_dim, ...]``: for each group, its query heads,
        its key head, its value head.
    """
    if num_heads % num_groups != 0:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_groups={num_groups}")
    per_group = num_heads // num_groups
    _check_rows("q", q, num_heads * head_dim)
    _check_rows("k", k, num_groups * head_dim)
    _check_rows("v", v, num_groups * head_dim)
    tail = q.shape[1:]
    q = q.reshape(num_groups, per_group * head_dim, *tail)  # [g, hpg*d, ...]
    k = k.reshape(num_groups, head_dim, *tail)  # [g, d, ...]
    v = v.reshape(num_groups, head_dim, *tail)
    fused = torch.cat([q, k, v], dim=1)  # [g, (hpg+2)*d, ...]
    return fused.reshape(-1, *tail).contiguous()


def split_qkv(
    fused: torch.Tensor, *, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: per-group ``linear_qkv`` rows -> (q, k, v) head after head."""
    if num_heads % num_groups != 0:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_groups={num_groups}")
    per_group = num_heads // num_groups
    _check_rows("linear_qkv", fused, num_groups * (per_group + 2) * head_dim)
    tail = fused.shape[1:]
    grouped = fused.reshape(num_groups, (per_group + 2) * head_dim, *tail)  # [g, (hpg+2)*d, ...]
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *tail).contiguous(),
        k.reshape(-1, *tail).contiguous(),
        v.reshape(-1, *tail).contiguous(),
    )


def fuse_gated_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``linear_fc1`` of a gated MLP: gate rows then up rows, ``[2 * ffn, ...]``."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} projections differ in shape")
    return torch.cat([gate, up], dim=0).contiguous()


def split_gated_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_gated_fc1`: ``[2 * ffn, ...]`` -> (gate, up)."""
    if fc1.shape[0] % 2 != 0:
        raise ValueError(f"gated linear_fc1 must have an even number of rows, found shape {tuple(fc1.shape)}")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def conv1d_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """GPT-2 ``Conv1D`` weight ``[in, out]`` -> ``nn.Linear`` weight ``[out, in]``."""
    return weight.t().contiguous()


def linear_to_conv1d(weight: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` weight ``[out, in]`` -> GPT-2 ``Conv1D`` weight ``[in, out]``."""
    return weight.t().contiguous()
