"""DotProductAttention masks and GQA, SelfAttention's fused QKV layout, CrossAttention, against plain maths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.norms import RMSNorm
from megatron_core.transformer.positions import causal_mask

S, B = 6, 2


def _config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=0.0, hidden_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _reference_attention(q, k, v, masked_out=None, bias=None, scale=None):
    """Plain softmax attention; q [sq,b,np,hn], k/v [sk,b,ng,hn], mask True = masked out."""
    np_, ng, hn = q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(np_ // ng, dim=2)
    v = v.repeat_interleave(np_ // ng, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) * (scale or 1 / math.sqrt(hn))
    if bias is not None:
        scores = scores + bias
    if masked_out is not None:
        scores = scores.masked_fill(masked_out, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bnqk,kbnd->qbnd", probs, v)
    return out.reshape(q.shape[0], q.shape[1], np_ * hn)


def _qkv(sq=S, sk=S, np_=4, ng=2, hn=8):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(sq, B, np_, hn, generator=g), torch.randn(sk, B, ng, hn, generator=g),
            torch.randn(sk, B, ng, hn, generator=g))


@pytest.mark.parametrize("ng", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal_matches_reference(ng):
    dpa = DotProductAttention(_config(kv_channels=8), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(ng=ng)
    expected = _reference_attention(q, k, v, causal_mask(S, S))
    torch.testing.assert_close(dpa(q, k, v, None), expected, atol=1e-6, rtol=1e-5)
    # An explicit causal mask gives the same result as the fast path.
    torch.testing.assert_close(dpa(q, k, v, causal_mask(S, S)[None, None]), expected, atol=1e-6, rtol=1e-5)


def test_padding_and_arbitrary_masks():
    dpa = DotProductAttention(_config(kv_channels=8), 1, AttnMaskType.padding, "self")
    q, k, v = _qkv()
    padding = torch.zeros(B, 1, S, S, dtype=torch.bool)
    padding[1, :, :, 4:] = True  # the second sequence has 4 real tokens
    torch.testing.assert_close(dpa(q, k, v, padding), _reference_attention(q, k, v, padding), atol=1e-6, rtol=1e-5)
    arbitrary = torch.rand(B, 4, S, S, generator=torch.Generator().manual_seed(1)) > 0.6
    arbitrary[..., 0] = False  # every query sees at least one key
    got = dpa(q, k, v, arbitrary, attn_mask_type=AttnMaskType.arbitrary)
    torch.testing.assert_close(got, _reference_attention(q, k, v, arbitrary), atol=1e-6, rtol=1e-5)
    assert dpa(q, k, v, None).shape == (S, B, 4 * 8)  # no mask at all


def test_fully_masked_rows_give_zeros_not_nan():
    dpa = DotProductAttention(_config(kv_channels=8), 1, AttnMaskType.padding, "self")
    q, k, v = _qkv()
    mask = torch.zeros(B, 1, S, S, dtype=torch.bool)
    mask[0, :, 2, :] = True
    out = dpa(q, k, v, mask)
    assert not out.isnan().any() and out[2, 0].abs().max() == 0


def test_causal_is_end_aligned_for_cached_keys_and_bias_is_added():
    dpa = DotProductAttention(_config(kv_channels=8), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(sq=2, sk=5)
    # Query i is at absolute position 3 + i: it sees keys 0..3+i.
    expected = _reference_attention(q, k, v, causal_mask(2, 5))
    assert causal_mask(2, 5).tolist() == [[False] * 4 + [True], [False] * 5]
    torch.testing.assert_close(dpa(q, k, v, None), expected, atol=1e-6, rtol=1e-5)
    bias = torch.randn(1, 4, 2, 5)
    torch.testing.assert_close(dpa(q, k, v, None, attention_bias=bias),
                               _reference_attention(q, k, v, causal_mask(2, 5), bias), atol=1e-6, rtol=1e-5)


def test_float_mask_is_rejected_with_a_fix():
    dpa = DotProductAttention(_config(kv_channels=8), 1, AttnMaskType.padding, "self")
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="True = masked out"):
        dpa(q, k, v, torch.zeros(B, 1, S, S))


def test_attention_dropout_only_in_training():
    dpa = DotProductAttention(_config(kv_channels=8, attention_dropout=0.5), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv()
    eval_out = dpa.eval()(q, k, v, None)
    torch.testing.assert_close(eval_out, _reference_attention(q, k, v, causal_mask(S, S)), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(dpa.train()(q, k, v, None), eval_out)


def _self_attention(cfg: TransformerConfig, qk_norm: bool = False) -> SelfAttention:
    subs = SelfAttentionSubmodules(ColumnParallelLinear, DotProductAttention, RowParallelLinear,
                                   q_layernorm=RMSNorm if qk_norm else None, k_layernorm=RMSNorm if qk_norm else None)
    return SelfAttention(cfg, subs, layer_number=1, attn_mask_type=AttnMaskType.causal)


def test_fused_qkv_is_laid_out_per_query_group():
    cfg = _config(num_attention_heads=6, num_query_groups=3, kv_channels=4, add_bias_linear=False)
    attn = _self_attention(cfg)
    x = torch.randn(S, B, 32)
    q, k, v = attn.get_query_key_value_tensors(x)
    w = attn.linear_qkv.weight  # [(6 + 2*3) * 4, 32]
    hn, per_group = 4, (2 + 2) * 4
    for g in range(3):
        rows = w[g * per_group:(g + 1) * per_group]
        for h in range(2):  # this group's two query heads
            torch.testing.assert_close(q[:, :, 2 * g + h], x @ rows[h * hn:(h + 1) * hn].T)
        torch.testing.assert_close(k[:, :, g], x @ rows[2 * hn:3 * hn].T)
        torch.testing.assert_close(v[:, :, g], x @ rows[3 * hn:4 * hn].T)


def test_self_attention_forward_matches_manual_with_qk_norm():
    cfg = _config(num_attention_heads=4, num_query_groups=2, qk_layernorm=True)
    attn = _self_attention(cfg, qk_norm=True)
    x = torch.randn(S, B, 32)
    out, bias = attn(x, None)
    q, k, v = attn.get_query_key_value_tensors(x)
    assert attn.q_layernorm.weight.tp_partial_grad
    context = _reference_attention(q, k, v, causal_mask(S, S))
    torch.testing.assert_close(out + bias, F.linear(context, attn.linear_proj.weight, attn.linear_proj.bias))


def test_cross_attention_matches_manual():
    cfg = _config()
    attn = CrossAttention(cfg, CrossAttentionSubmodules(ColumnParallelLinear, ColumnParallelLinear,
                                                        DotProductAttention, RowParallelLinear), layer_number=1)
    x, context = torch.randn(S, B, 32), torch.randn(9, B, 32)
    pad = torch.zeros(B, 1, S, 9, dtype=torch.bool)
    pad[0, ..., 7:] = True
    out, bias = attn(x, pad, key_value_states=context)
    q = (x @ attn.linear_q.weight.T + attn.linear_q.bias).view(S, B, 4, 8)
    kv = (context @ attn.linear_kv.weight.T + attn.linear_kv.bias).view(9, B, 4, 16)
    expected = _reference_attention(q, kv[..., :8], kv[..., 8:], pad)
    torch.testing.assert_close(out + bias, F.linear(expected, attn.linear_proj.weight, attn.linear_proj.bias))
    with pytest.raises(ValueError, match="key_value_states"):
        attn(x, None)


def test_bf16_softmax_runs_in_fp32():
    """``attention_softmax_in_fp32`` (the only value accepted): with bf16 q, k, v the scores and softmax are
    computed in fp32, so the output is as close to the float64 truth as the fp32 computation on the same
    bf16 inputs (rounded once to bf16); a softmax computed in bf16 is over 10x further off."""
    dpa = DotProductAttention(_config(kv_channels=32), 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    s = 64
    q, k, v = (3 * torch.randn(s, B, 4, 32, generator=g).bfloat16() for _ in range(3))
    mask = causal_mask(s, s)
    truth = _reference_attention(q.double(), k.double(), v.double(), mask)
    got = dpa(q, k, v, None)
    assert got.dtype == torch.bfloat16

    def err(x: torch.Tensor) -> float:
        return float((x.double() - truth).abs().max())

    in_fp32 = _reference_attention(q.float(), k.float(), v.float(), mask).bfloat16()
    in_bf16 = _reference_attention(q, k, v, mask)
    assert err(got) <= 1.25 * err(in_fp32), (err(got), err(in_fp32))
    assert err(in_bf16) > 10 * err(got), (err(got), err(in_bf16))
    with pytest.raises(ValueError, match="attention_softmax_in_fp32=False"):
        _config(attention_softmax_in_fp32=False)
