"""fp32 CPU matmuls of the linear layers through oneDNN, where it beats torch's default BLAS.

Why: torch runs an fp32 ``F.linear`` on CPU as an MKL sgemm. On the AMD EPYC (AVX-512) machines this
project is benchmarked on, MKL's ``x @ W^T`` reaches ~170-185 GFLOP/s on two threads at GPT-2 shapes
and ~145 for a vocabulary-wide output, while oneDNN's matmul (shipped inside torch, used by
``torch.compile``'s CPU backend as ``mkldnn::_linear_pointwise``) reaches ~200-215 on the same
operands; the input gradient ``g @ W`` gains ~10% the same way. The weight gradient ``g^T @ x``
(contraction over tokens) is the one product where MKL stays as fast or faster, so it stays on
``torch.mm``. Same products, another summation order: results differ from ``F.linear`` by a few
fp32 ulps.

``TransformerConfig.cpu_matmul`` picks the backend ("onednn", the default, or "torch" for bit-equality
with ``F.linear``); anything that is not a CPU fp32 tensor (CUDA, bf16, autocast) takes ``F.linear``
whatever the setting.

Under ``torch.compile`` the product goes through the custom op ``megatron_core::onednn_matmul_nt``
(same kernel): inductor treats it as an opaque call and fuses the elementwise work around it. Calling
``mkldnn::_linear_pointwise`` inside a traced graph fails in inductor's lowering, and letting inductor
pick its own GEMM gives MKL's slower sgemm.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

CpuMatmul = Literal["onednn", "torch"]


def _onednn_op() -> Any:
    """torch's oneDNN linear op, or None when this torch build has no oneDNN (mkldnn) CPU backend."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_LINEAR = _onednn_op()


def onednn_applies(backend: CpuMatmul, *tensors: torch.Tensor | None) -> bool:
    """Whether a matmul of ``tensors`` runs through oneDNN: backend "onednn", oneDNN built in, all CPU fp32, no autocast."""
    if backend != "onednn" or _LINEAR is None or torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided)
               for t in tensors)


def _onednn_matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _LINEAR(a, b, bias, "none", [], "")


# The same function registered as an op that torch.compile keeps opaque (see the module doc).
_matmul_nt_op = torch.library.custom_op("megatron_core::onednn_matmul_nt", _onednn_matmul_nt, mutates_args=())


@_matmul_nt_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for ``a [m, k]``, ``b [n, k]`` (any strides) through oneDNN; no autograd.

    Callers check :func:`onednn_applies` first. Eager calls go straight to the kernel (through the
    custom op a call costs ~12 us more: 27 vs 15 us for a 4 x 16 product); traced calls use the op.
    """
    if torch.compiler.is_compiling():
        return _matmul_nt_op(a, b, bias)
    return _onednn_matmul_nt(a, b, bias)


class _OneDNNLinear(torch.autograd.Function):
    """``x @ W^T + b``: forward and input gradient through oneDNN, weight gradient through ``torch.mm``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias)  # [tokens, out]
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(grad2, weight.t()).view(x.shape)  # g @ W
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad2.t(), x.reshape(-1, x.shape[-1]))  # g^T @ x: MKL is as fast here
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(dim=0)
        return grad_x, grad_w, grad_b


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: CpuMatmul = "onednn"
) -> torch.Tensor:
    """``F.linear(input, weight, bias)``, through oneDNN for CPU fp32 tensors when ``backend`` is "onednn"."""
    if input.dim() == 0 or input.numel() == 0 or weight.dim() != 2 or not onednn_applies(backend, input, weight, bias):
        return F.linear(input, weight, bias)
    return _OneDNNLinear.apply(input, weight, bias)
