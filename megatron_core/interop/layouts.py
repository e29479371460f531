"""Weight layout conversions shared by the Hugging Face family converters.

Megatron-Core fuses the attention input projection into one ``linear_qkv`` matrix laid out *per
query group*: for each group g, the rows of its ``heads // groups`` query heads, then its key head,
then its value head (``kv_channels`` rows each). Hugging Face models keep separate q/k/v blocks
(``q_proj``/``k_proj``/``v_proj``, or GPT-2's concatenated ``[q; k; v]``). Gated MLPs keep
``linear_fc1 = [gate; up]``. These functions move between the two, exactly (pure reindexing, no
arithmetic), so a round trip returns bit-identical tensors.

The ``*_transforms`` functions return (forward, inverse) pairs for :class:`keymap.KeyRule`
(forward: Hugging Face tensors -> ours), e.g.
``KeyRule(ours_qkv, (q, k, v), *qkv_transforms(heads, groups, head_dim))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_core.config import TransformerConfig
from megatron_core.interop.keymap import Transform, is_reindexing, reindexing

TransformPair = tuple[Transform, Transform]


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


def fuse_kv(k: torch.Tensor, v: torch.Tensor, *, num_heads: int, head_dim: int) -> torch.Tensor:
    """Separate ``k``/``v`` ``[heads * d, h]`` -> cross-attention ``linear_kv`` rows ``[k_0; v_0; k_1; v_1; ...]``."""
    _check_rows("k", k, num_heads * head_dim)
    _check_rows("v", v, num_heads * head_dim)
    tail = k.shape[1:]
    pairs = torch.stack([k.reshape(num_heads, head_dim, *tail), v.reshape(num_heads, head_dim, *tail)], dim=1)
    return pairs.reshape(2 * num_heads * head_dim, *tail).contiguous()  # [heads, 2, d, h] -> [2*heads*d, h]


def split_kv(kv: torch.Tensor, *, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_kv`."""
    _check_rows("linear_kv", kv, 2 * num_heads * head_dim)
    tail = kv.shape[1:]
    pairs = kv.reshape(num_heads, 2, head_dim, *tail)
    return (pairs[:, 0].reshape(num_heads * head_dim, *tail).contiguous(),
            pairs[:, 1].reshape(num_heads * head_dim, *tail).contiguous())


# ---------------------------------------------------------------------- transform pairs for key tables
def _one(fn: Callable[[torch.Tensor], torch.Tensor]) -> Transform:
    """A transform of one tensor into one tensor."""

    def transform(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        (tensor,) = tensors
        return [fn(tensor)]

    return transform


def _pair(forward: Transform, inverse: Transform) -> TransformPair:
    """A pair of pure reindexing transforms (``load_hf_dir`` reads only each rank's part of their sources)."""
    return reindexing(forward), reindexing(inverse)


#: GPT-2 ``Conv1D`` ``[in, out]`` <-> ``nn.Linear`` ``[out, in]``.
TRANSPOSE: TransformPair = _pair(_one(conv1d_to_linear), _one(linear_to_conv1d))


def qkv_transforms(num_heads: int, num_groups: int, head_dim: int) -> TransformPair:
    """(q, k, v) <-> our per-query-group ``linear_qkv`` (weights or biases)."""

    def fuse(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        q, k, v = tensors
        return [fuse_qkv(q, k, v, num_heads=num_heads, num_groups=num_groups, head_dim=head_dim)]

    def split(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        (fused,) = tensors
        return split_qkv(fused, num_heads=num_heads, num_groups=num_groups, head_dim=head_dim)

    return _pair(fuse, split)


def config_qkv_transforms(config: TransformerConfig) -> TransformPair:
    """:func:`qkv_transforms` with the heads, query groups and head size of ``config``."""
    if config.kv_channels is None or config.num_query_groups is None:
        raise ValueError("config.kv_channels / num_query_groups are unset; build the TransformerConfig first")
    return qkv_transforms(config.num_attention_heads, config.num_query_groups, config.kv_channels)


def kv_transforms(num_heads: int, head_dim: int) -> TransformPair:
    """(k, v) <-> our cross-attention ``linear_kv`` (``[k_h; v_h]`` per head)."""
    return _pair(lambda t: [fuse_kv(*t, num_heads=num_heads, head_dim=head_dim)],
                 lambda t: split_kv(*t, num_heads=num_heads, head_dim=head_dim))


#: (gate, up) <-> a gated MLP's ``linear_fc1 = [gate; up]``.
GATED_FC1: TransformPair = _pair(lambda t: [fuse_gated_fc1(*t)], lambda t: split_gated_fc1(*t))


def split_rows_transforms(parts: int) -> TransformPair:
    """One tensor of ``parts`` equal row blocks (e.g. GPT-2's ``[q; k; v]``) <-> the ``parts`` blocks."""

    def split(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        (tensor,) = tensors
        if tensor.shape[0] % parts:
            raise ValueError(f"expected {parts} equal row blocks, found shape {tuple(tensor.shape)}")
        return [block.contiguous() for block in torch.chunk(tensor, parts, dim=0)]

    return _pair(split, lambda t: [torch.cat(list(t), dim=0)])


def unstack_transforms() -> TransformPair:
    """One stacked tensor ``[n, ...]`` (e.g. fused MoE experts) <-> ``n`` tensors ``[...]``."""
    return _pair(lambda t: [x.contiguous() for x in t[0].unbind(0)], lambda t: [torch.stack(list(t), dim=0)])


def chain(*pairs: TransformPair) -> TransformPair:
    """Apply the forward transforms in order (and the inverses in reverse order)."""

    def forward(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        for fn, _ in pairs:
            tensors = fn(tensors)
        return tensors

    def inverse(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        for _, fn in reversed(pairs):
            tensors = fn(tensors)
        return tensors

    if all(is_reindexing(fn) for pair in pairs for fn in pair):
        return _pair(forward, inverse)
    return forward, inverse
