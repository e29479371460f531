"""The 16-bit CPU dropout against the binomial law it must follow, against torch's RNG state, and its gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_core.tensor_parallel.cpu_dropout import dropout, dropout_add, keep_mask, rounded_probability
from megatron_core.tensor_parallel.random import get_rng_tracker, model_parallel_manual_seed
from megatron_core.transformer.bias_dropout_add import get_bias_dropout_add

N = 1 << 22  # 4M elements: the binomial standard deviation of a drop fraction is <= 2.5e-4


def _sigma(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1 / 3])
def test_drop_fraction_follows_the_binomial_law(p):
    torch.manual_seed(0)
    keep, scale = keep_mask((N,), p)
    rounded = rounded_probability(p)
    assert abs(rounded - p) <= 2**-17
    assert scale == pytest.approx(1 / (1 - rounded), rel=1e-12)
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - p) < 5 * _sigma(p, N)


def test_every_16_bit_lane_and_neighbouring_pairs_are_independent():
    """Each element of a 64-bit draw uses its own 16 bits: per-lane fractions and pairs follow p and p^2."""
    p = 0.25
    torch.manual_seed(1)
    keep, _ = keep_mask((N,), p)
    dropped = ~keep.view(-1, 4)  # [draws, lane]
    for lane in range(4):
        assert abs(dropped[:, lane].double().mean().item() - p) < 5 * _sigma(p, N // 4), lane
    for a, b in ((0, 1), (1, 2), (2, 3)):
        both = (dropped[:, a] & dropped[:, b]).double().mean().item()
        assert abs(both - p * p) < 5 * _sigma(p * p, N // 4), (a, b)
    across = (dropped[:-1, 3] & dropped[1:, 0]).double().mean().item()  # last lane of a draw, first of the next
    assert abs(across - p * p) < 5 * _sigma(p * p, N // 4 - 1)


def test_expected_output_equals_the_input():
    torch.manual_seed(2)
    out = dropout(torch.ones(N), 0.1)
    kept = (out != 0).double().mean().item()
    assert abs(out.double().mean().item() - 1.0) < 5 * _sigma(0.1, N) / (1 - 0.1) + 1e-9
    values = out.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - rounded_probability(0.1)))]
    assert 0.89 < kept < 0.91


def test_masks_follow_torchs_generator_and_the_rng_tracker():
    x = torch.randn(1000)
    torch.manual_seed(3)
    first = dropout(x, 0.5)
    second = dropout(x, 0.5)
    assert not torch.equal(first, second)  # the generator advanced
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), first)
    state = torch.get_rng_state()
    again = dropout(x, 0.5)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.5), again)
    model_parallel_manual_seed(5)
    with get_rng_tracker().fork():
        forked = dropout(x, 0.5)
    model_parallel_manual_seed(5)
    with get_rng_tracker().fork():
        assert torch.equal(dropout(x, 0.5), forked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_and_gradient_are_the_masked_scaled_input(dtype):
    torch.manual_seed(4)
    x = (torch.rand(3, 5, 64, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()  # no zeros of its own
    grad = torch.randn(3, 5, 64, dtype=dtype)
    out = dropout(x, 0.3)
    out.backward(grad)
    kept = out.detach() != 0
    scale = 1 / (1 - rounded_probability(0.3))
    torch.testing.assert_close(out.detach(), torch.where(kept, x.detach() * scale, 0).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.where(kept, grad * scale, 0).to(dtype), rtol=0, atol=0)


def test_dropout_add_and_the_fused_bias_dropout_add():
    x, residual, bias = torch.rand(16, 2, 32) + 0.5, torch.randn(16, 2, 32), torch.rand(32) + 0.1
    x.requires_grad_()
    torch.manual_seed(6)
    out = get_bias_dropout_add(training=True, fused=True)((x, bias), residual, 0.2)
    kept = out != residual  # x + bias > 0 everywhere, so a kept element always moves the residual
    scale = 1 / (1 - rounded_probability(0.2))
    torch.testing.assert_close(out, residual + torch.where(kept, (x + bias) * scale, 0), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, scale, 0.0))
    assert 0.15 < 1 - kept.double().mean().item() < 0.25
    torch.manual_seed(6)
    assert torch.equal(dropout_add(x.detach() + bias, residual, 0.2), out.detach())
    # evaluation, p = 0 and the unfused path: plain residual + x (+ bias)
    torch.testing.assert_close(get_bias_dropout_add(False, True)((x, bias), residual, 0.2), residual + x + bias)
    torch.testing.assert_close(dropout_add(x, residual, 0.0), residual + x)
    torch.manual_seed(7)
    unfused = get_bias_dropout_add(True, False)((x, None), residual, 0.2)
    torch.manual_seed(7)
    torch.testing.assert_close(unfused, residual + F.dropout(x, 0.2))


def test_edges_and_bad_probabilities():
    x = torch.randn(10)
    assert dropout(x, 0.0) is x and dropout(x, 0.7, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros(10))
    assert rounded_probability(2**-18) == 0.0  # below the 16-bit resolution: nothing is dropped
    with pytest.raises(ValueError, match="between 0 and 1, but got 1.5"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match="between 0 and 1, but got -0.1"):
        keep_mask((4,), -0.1)
    # integer tensors are not this kernel's: F.dropout decides (and refuses them)
    with pytest.raises(RuntimeError):
        dropout(torch.arange(4), 0.5)


def test_traced_by_torch_compile_without_graph_breaks():
    """dynamo cannot trace ``random_``; under compile the masks come from traceable ops (F.dropout, torch.rand)."""
    torch._dynamo.reset()
    x, residual = torch.randn(64, 64), torch.randn(64, 64)
    for fn in (lambda x: dropout(x, 0.1), lambda x: dropout_add(x, residual, 0.1), lambda x: keep_mask(x.shape, 0.5)[0]):
        explanation = torch._dynamo.explain(fn)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lambda x: keep_mask(x.shape, 0.25)[0], backend="aot_eager")
    torch.manual_seed(8)
    assert abs(1 - compiled(torch.empty(N)).double().mean().item() - 0.25) < 5 * _sigma(0.25, N)
