"""blocked_causal_attention against plain float64 maths and SDPA, and when DotProductAttention uses it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import megatron_core.transformer.dot_product_attention as dpa_module
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel.cpu_dropout import keep_mask
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.transformer.blocked_causal_attention import (
    blocked_causal_attention,
    query_blocks,
    saved_probability_bytes,
)
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.transformer_block import TransformerBlock
from specs.gpt import get_gpt_layer_local_spec

# (b, np, ng, s, hn, block_size): one block, s not divisible by the block, GQA/MQA, b=1, s=1..3.
SHAPES = [
    (2, 4, 4, 7, 8, None),
    (1, 4, 2, 130, 16, None),
    (2, 6, 2, 37, 8, 8),
    (1, 3, 1, 20, 4, 6),
    (2, 2, 2, 1, 8, None),
    (1, 4, 2, 2, 8, 1),
    (3, 2, 1, 3, 8, 2),
]


def _plain_causal(q, k, v, scale, keep=None, keep_scale=1.0):
    """softmax(q k^T * scale + causal mask) v with K/V repeated per query head; [b, np, s, hn].

    ``keep`` ([b, np, s, s] bool): dropout on the probabilities, kept ones scaled by ``keep_scale``.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs if keep is None else probs * keep * keep_scale) @ v


def _inputs(b, np_, ng, s, hn, dtype):
    """q/k/v as the attention layer hands them over: permuted views of [s, b, heads, hn] tensors."""
    g = torch.Generator().manual_seed(s * 100 + np_)
    q = torch.randn(s, b, np_, hn, generator=g, dtype=dtype).permute(1, 2, 0, 3)
    k = torch.randn(s, b, ng, hn, generator=g, dtype=dtype).permute(1, 2, 0, 3)
    v = torch.randn(s, b, ng, hn, generator=g, dtype=dtype).permute(1, 2, 0, 3)
    grad = torch.randn(b, np_, s, hn, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)], grad


def _value_and_grads(fn, inputs, grad):
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-np{}-ng{}-s{}-hn{}-blk{}".format(*s))
def test_matches_plain_attention_in_float64(shape):
    b, np_, ng, s, hn, block = shape
    inputs, grad = _inputs(b, np_, ng, s, hn, torch.float64)
    scale = 1 / math.sqrt(hn)
    got = _value_and_grads(lambda q, k, v: blocked_causal_attention(q, k, v, scale, block), inputs, grad)
    expected = _value_and_grads(lambda q, k, v: _plain_causal(q, k, v, scale), inputs, grad)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "b{}-np{}-ng{}-s{}-hn{}-blk{}".format(*s))
def test_matches_sdpa_is_causal_in_float32(shape):
    b, np_, ng, s, hn, block = shape
    inputs, grad = _inputs(b, np_, ng, s, hn, torch.float32)
    got = _value_and_grads(lambda q, k, v: blocked_causal_attention(q, k, v, 0.3, block), inputs, grad)
    expected = _value_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True),
        inputs, grad,
    )
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-6, msg=name)


def test_blocks_and_saved_bytes():
    assert query_blocks(130) == [(0, 64), (64, 128), (128, 130)]
    assert query_blocks(3, 2) == [(0, 2), (2, 3)]
    assert query_blocks(40) == [(0, 40)]
    assert saved_probability_bytes(2, 12, 512) == 2 * 12 * 64 * 64 * (1 + 8) * 8 // 2 * 4  # 9/16 of s^2
    with pytest.raises(ValueError, match="block_size=0"):
        query_blocks(8, 0)
    # What the forward keeps for its backward: q, k, v and exactly saved_probability_bytes of probabilities.
    b, np_, ng, s, hn = 1, 4, 2, 70, 8
    inputs, _ = _inputs(b, np_, ng, s, hn, torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        blocked_causal_attention(*inputs, 0.5)
    qkv_bytes = (np_ + 2 * ng) * b * s * hn * 4
    assert sum(t.numel() * t.element_size() for t in saved) == qkv_bytes + saved_probability_bytes(b, np_, s)


def _block_keep_masks(b, np_, ng, s, p, seed):
    """The keep masks the kernel draws after ``torch.manual_seed(seed)``, assembled as ``[b, np, s, s]``, and their scale.

    The kernel draws one ``keep_mask`` per query block, in block order, shaped ``[b * ng, rows * r, end]``
    (row = position * r + head within the group); positions a block cannot see stay False.
    """
    r = np_ // ng
    torch.manual_seed(seed)
    full = torch.zeros(b * ng, s * r, s, dtype=torch.bool)
    scale = 1.0
    for start, end in query_blocks(s):
        full[:, start * r:end * r, :end], scale = keep_mask((b * ng, (end - start) * r, end), p)
    return full.view(b, ng, s, r, s).transpose(2, 3).reshape(b, np_, s, s), scale


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=["s7-mha", "s130-gqa"])
def test_dropout_matches_plain_attention_with_the_same_masks(shape):
    b, np_, ng, s, hn, _ = shape
    p, seed = 0.3, 11
    inputs, grad = _inputs(b, np_, ng, s, hn, torch.float32)
    scale = 1 / math.sqrt(hn)
    torch.manual_seed(seed)
    got = _value_and_grads(lambda q, k, v: blocked_causal_attention(q, k, v, scale, dropout_p=p), inputs, grad)
    keep, keep_scale = _block_keep_masks(b, np_, ng, s, p, seed)
    f64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = _value_and_grads(lambda q, k, v: _plain_causal(q, k, v, scale, keep, keep_scale), f64, grad.double())
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_saves_one_byte_per_probability_more():
    b, np_, ng, s, hn = 1, 4, 2, 70, 8
    inputs, _ = _inputs(b, np_, ng, s, hn, torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        blocked_causal_attention(*inputs, 0.5, dropout_p=0.1)
    qkv_bytes = (np_ + 2 * ng) * b * s * hn * 4
    assert saved_probability_bytes(b, np_, s, dropout=True) == saved_probability_bytes(b, np_, s) * 5 // 4
    assert sum(t.numel() * t.element_size() for t in saved) == qkv_bytes + saved_probability_bytes(
        b, np_, s, dropout=True)


def test_rejects_mismatched_shapes():
    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="np divisible by ng"):
        blocked_causal_attention(q, k, k, 0.5)


# --- DotProductAttention: which kernel runs --------------------------------------------------------------

S, B, NP, NG, HN = dpa_module.BLOCKED_MIN_SEQ, 1, 4, 2, 8


def _dpa(dropout=0.0) -> DotProductAttention:
    config = TransformerConfig(num_layers=1, hidden_size=NP * HN, num_attention_heads=NP, num_query_groups=NG,
                               attention_dropout=dropout, hidden_dropout=0.0)
    return DotProductAttention(config, 1, AttnMaskType.causal, "self").train()


@pytest.fixture
def blocked_calls(monkeypatch):
    """Counts the DotProductAttention calls that went through the blocked kernel."""
    calls = []
    real = dpa_module.blocked_causal_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpa_module, "blocked_causal_attention", spy)
    return calls


def _attend(module, dtype=torch.float32, mask=None, seq=S):
    """Output [s, b, np*hn] and q/k/v gradients of ``module(q, k, v, mask)`` on fixed random inputs."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(seq, B, NP, HN, generator=g).to(dtype).requires_grad_()
    k = torch.randn(seq, B, NG, HN, generator=g).to(dtype).requires_grad_()
    v = torch.randn(seq, B, NG, HN, generator=g).to(dtype).requires_grad_()
    out = module(q, k, v, mask)
    return [t.float() for t in (out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))]


def _plain_layer(q, k, v, mask):
    """The float64 plain causal attention in the layer's layout: [s, b, heads, hn] -> [s, b, np*hn]."""
    out = _plain_causal(*(t.double().permute(1, 2, 0, 3) for t in (q, k, v)), 1 / math.sqrt(HN))
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _assert_all_close(got, expected):
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-6, msg=name)


def test_training_fp32_causal_uses_the_blocked_kernel_and_agrees_with_sdpa(blocked_calls, monkeypatch):
    module = _dpa()
    blocked = _attend(module)
    assert blocked_calls == [(B, NP, S, HN)]
    monkeypatch.setattr(dpa_module, "BLOCKED_MAX_SAVED_BYTES", 0)  # above the cap: SDPA's flash kernel
    sdpa = _attend(module)
    assert len(blocked_calls) == 1
    _assert_all_close(blocked, sdpa)
    _assert_all_close(blocked, _attend(_plain_layer))


def test_cap_is_on_the_saved_probabilities(blocked_calls, monkeypatch):
    monkeypatch.setattr(dpa_module, "BLOCKED_MAX_SAVED_BYTES", saved_probability_bytes(B, NP, S))
    _attend(_dpa())
    assert len(blocked_calls) == 1  # exactly at the cap: still blocked
    monkeypatch.setattr(dpa_module, "BLOCKED_MAX_SAVED_BYTES", saved_probability_bytes(B, NP, S) - 1)
    _attend(_dpa())
    assert len(blocked_calls) == 1


def test_compiled_training_keeps_the_blocked_kernel():
    """Traced by torch.compile (dynamo + AOTAutograd) the blocked kernel stays: bmm in the graphs, no SDPA, same numbers."""
    from torch._dynamo.backends.common import aot_autograd

    targets: set[str] = set()

    def compiler(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_dpa(), backend=aot_autograd(fw_compiler=compiler, bw_compiler=compiler))
    got = _attend(compiled)
    assert "aten.bmm.default" in targets
    assert not [t for t in targets if "scaled_dot_product" in t]
    _assert_all_close(got, _attend(_plain_layer))


def test_attention_dropout_runs_the_blocked_kernel_at_any_length(blocked_calls):
    """With dropout SDPA would leave its flash kernel for the math path, so even short sequences go blocked."""
    seq = 40  # below BLOCKED_MIN_SEQ
    module = _dpa(dropout=0.2)
    model_parallel_manual_seed(3)
    got = _attend(module, seq=seq)
    assert blocked_calls == [(B, NP, seq, HN)]
    model_parallel_manual_seed(3)
    again = _attend(module, seq=seq)
    for g, a in zip(got, again, strict=True):  # the masks come from the model-parallel RNG stream
        torch.testing.assert_close(g, a, rtol=0, atol=0)
    no_dropout = _attend(_dpa(), seq=seq)
    assert not torch.allclose(got[0], no_dropout[0])
    # The output's mean over many masks approaches the undropped output (the keep scale makes it unbiased).
    model_parallel_manual_seed(4)
    mean = torch.stack([_attend(module, seq=seq)[0] for _ in range(400)]).mean(0)
    assert (mean - no_dropout[0]).abs().mean() < 0.15 * no_dropout[0].abs().mean()


@pytest.mark.parametrize("case", ["eval", "mask", "short", "bf16", "autocast"])
def test_sdpa_keeps_everything_else(case, blocked_calls):
    module = _dpa()
    if case == "eval":
        module.eval()
    mask = torch.ones(S, S, dtype=torch.bool).triu(1) if case == "mask" else None
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    seq = S - 1 if case == "short" else S
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = _attend(module, dtype, mask, seq)
    assert blocked_calls == []
    if case in ("eval", "mask", "short"):  # the same maths as the blocked kernel's
        _assert_all_close(got, _attend(_plain_layer, seq=seq))


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("recompute", [dict(recompute_granularity="selective"),
                                       dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1)], ids=["selective", "full"])
def test_recompute_stays_bit_exact_on_the_blocked_path(recompute, dropout, blocked_calls):
    # The kernel is chosen by training mode, not grad mode, so the no-grad first pass of a
    # checkpoint and its recompute run the same kernel; with dropout they draw the same masks.
    def run(**overrides):
        torch.manual_seed(1)
        model_parallel_manual_seed(1)
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=dropout,
                                   attention_dropout=dropout, **overrides)
        block = TransformerBlock(config, get_gpt_layer_local_spec()).train()
        hidden = torch.randn(S, 1, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
        out = block(hidden, attention_mask=None)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.detach(), hidden.grad, *(p.grad for p in block.parameters())]

    reference = run()
    assert len(blocked_calls) == 2
    for got, expected in zip(run(**recompute), reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
