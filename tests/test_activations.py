"""Activations against float64 torch references (the registry's fast CPU forms included)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_core.activations import gelu_tanh


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_gelu_tanh_matches_float64_gelu_new(scale):
    """Values and gradients of the CPU sigmoid form vs F.gelu(approximate="tanh") in float64.

    Tolerances are those fp32 F.gelu itself meets (checked alongside), so a wrong constant or a
    dropped term of the derivative fails.
    """
    torch.manual_seed(0)
    x64 = (torch.randn(50_000, dtype=torch.float64) * scale).requires_grad_()
    grad = torch.randn(50_000, dtype=torch.float64)
    ref = F.gelu(x64, approximate="tanh")
    ref.backward(grad)
    for fn in (gelu_tanh, lambda t: F.gelu(t, approximate="tanh")):
        x = x64.detach().float().requires_grad_()
        out = fn(x)
        out.backward(grad.float())
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_other_dtypes_are_torch_exactly():
    x = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    x = torch.randn(64, dtype=torch.float64)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
