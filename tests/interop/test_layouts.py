"""Layout reindexing between Hugging Face q/k/v, gate/up, Conv1D and ours."""

from __future__ import annotations

import pytest
import torch

from megatron_core.interop.layouts import (
    conv1d_to_linear,
    fuse_gated_fc1,
    fuse_qkv,
    linear_to_conv1d,
    split_gated_fc1,
    split_qkv,
)


def _rows(tag: float, heads: int, head_dim: int) -> torch.Tensor:
    # Row value = tag + head index, so the fused order can be read off directly.
    return (tag + torch.arange(heads).repeat_interleave(head_dim)).float().unsqueeze(1).expand(-1, 3)


def test_fuse_qkv_is_per_query_group():
    heads, groups, d = 4, 2, 2
    fused = fuse_qkv(_rows(100, heads, d), _rows(200, groups, d), _rows(300, groups, d),
                     num_heads=heads, num_groups=groups, head_dim=d)
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1 (each head_dim rows)
    expected = [100, 101, 200, 300, 102, 103, 201, 301]
    assert fused[::d, 0].tolist() == expected
    assert fused.shape == (heads * d + 2 * groups * d, 3)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1), (6, 3)])
def test_split_inverts_fuse_exactly(heads, groups):
    d, hidden = 3, 5
    q, k, v = torch.randn(heads * d, hidden), torch.randn(groups * d, hidden), torch.randn(groups * d, hidden)
    dims = {"num_heads": heads, "num_groups": groups, "head_dim": d}
    for got, want in zip(split_qkv(fuse_qkv(q, k, v, **dims), **dims), (q, k, v), strict=True):
        assert torch.equal(got, want)
    bias = [t[:, 0].contiguous() for t in (q, k, v)]
    for got, want in zip(split_qkv(fuse_qkv(*bias, **dims), **dims), bias, strict=True):
        assert torch.equal(got, want)


def test_shape_errors_name_the_projection():
    with pytest.raises(ValueError, match="k: expected 4 rows"):
        fuse_qkv(torch.zeros(8, 2), torch.zeros(6, 2), torch.zeros(4, 2), num_heads=4, num_groups=2, head_dim=2)
    with pytest.raises(ValueError, match="linear_qkv"):
        split_qkv(torch.zeros(10, 2), num_heads=4, num_groups=2, head_dim=2)


def test_gated_fc1_and_conv1d_roundtrip():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = fuse_gated_fc1(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = split_gated_fc1(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    w = torch.randn(4, 7)  # Conv1D [in, out]
    assert conv1d_to_linear(w).shape == (7, 4)
    assert torch.equal(linear_to_conv1d(conv1d_to_linear(w)), w)
