"""The oneDNN linear against float64 torch: same outputs and gradients (fp32 tolerance); "torch" is F.linear exactly."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.tensor_parallel.cpu_matmul import linear, onednn_applies

needs_onednn = pytest.mark.skipif(not onednn_applies("onednn", torch.ones(1)), reason="torch built without oneDNN")


def _ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _reference(x, w, b, grad):
    """float64 F.linear: output and (x, w, b) gradients."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    out = F.linear(x64, w64, b64)
    out.backward(grad.double())
    return out, x64.grad, w64.grad, None if b64 is None else b64.grad


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 3, 48), (5, 48), (48,)])
def test_onednn_linear_matches_float64(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 40)
    out = linear(x, w, b, "onednn")
    out.backward(grad)
    ref, gx, gw, gb = _reference(x, w, b, grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.grad.double(), gb, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_runs_onednn_and_takes_strided_inputs():
    torch.manual_seed(1)
    x = torch.randn(48, 6, 4).permute(1, 2, 0).requires_grad_()  # non-contiguous [6, 4, 48]
    w = torch.randn(48, 32).t().requires_grad_()  # non-contiguous [32, 48]
    grad = torch.randn(6, 4, 32)
    ops = _ops(lambda: linear(x, w, None, "onednn").backward(grad))
    assert "mkldnn::_linear_pointwise" in ops
    ref, gx, gw, _ = _reference(x, w, None, grad)
    torch.testing.assert_close(linear(x, w, None, "onednn").double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-5)


def test_torch_backend_low_precision_and_empty_inputs_are_f_linear_exactly():
    torch.manual_seed(2)
    w, b = torch.randn(16, 8), torch.randn(16)
    x = torch.randn(5, 8)
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w, b, "torch"))
    assert torch.equal(linear(x, w, b, "torch"), F.linear(x, w, b))
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert torch.equal(linear(xb, wb, bb, "onednn"), F.linear(xb, wb, bb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x, w, b, "onednn"), F.linear(x, w, b))
    assert linear(torch.randn(0, 8), w, b, "onednn").shape == (0, 16)


@needs_onednn
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_parallel_linears_follow_config_cpu_matmul(cls):
    """The config's switch reaches the layer: oneDNN by default, F.linear's bits with "torch"."""
    kwargs = {"input_is_parallel": True, "skip_bias_add": False} if cls is RowParallelLinear else {}
    layers = {}
    for backend in ("onednn", "torch"):
        torch.manual_seed(3)
        cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, cpu_matmul=backend)
        layers[backend] = cls(24, 40, config=cfg, init_method=torch.nn.init.normal_, bias=True, **kwargs)
    x = torch.randn(5, 2, 24)
    assert "mkldnn::_linear_pointwise" in _ops(lambda: layers["onednn"](x))
    plain = layers["torch"]
    assert torch.equal(plain(x)[0], F.linear(x, plain.weight, plain.bias))
    torch.testing.assert_close(layers["onednn"](x)[0], plain(x)[0], rtol=1e-5, atol=1e-5)


def test_cpu_matmul_config_rejects_unknown_backend():
    with pytest.raises(ValueError, match="cpu_matmul"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, cpu_matmul="mkl")


def _gelu_of_linear(x, w, b):
    return F.gelu(linear(x, w, b, "onednn"))


@needs_onednn
def test_traced_linear_keeps_the_onednn_kernel_as_one_opaque_op():
    """Under torch.compile the forward and input-gradient products are our custom op (inductor fuses around it)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list] = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append({node.target for node in gm.graph.nodes})
            return gm.forward
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(_gelu_of_linear, backend=aot_autograd(fw_compiler=recorder("forward"),
                                                                   bw_compiler=recorder("backward")))
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 32, requires_grad=True), torch.randn(24, 32, requires_grad=True), torch.randn(24)
    compiled(x, w, b).sum().backward()
    op = torch.ops.megatron_core.onednn_matmul_nt.default
    assert graphs["forward"] and all(op in targets for targets in graphs["forward"])
    assert graphs["backward"] and all(op in targets for targets in graphs["backward"])


@needs_onednn
@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")),
                    reason="inductor's CPU backend needs a C++ compiler (g++ or $CXX)")
def test_linear_compiled_by_inductor_matches_float64():
    """Inductor compiles the traced linear (calling the oneDNN op directly there failed in its lowering)."""
    torch._dynamo.reset()
    compiled = torch.compile(_gelu_of_linear, backend="inductor")
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 32, requires_grad=True), torch.randn(24, 32, requires_grad=True), torch.randn(24)
    grad = torch.randn(6, 24)
    out = compiled(x, w, b)
    out.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.gelu(F.linear(x64, w64, b.double()))
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
