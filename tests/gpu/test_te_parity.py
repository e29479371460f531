"""Transformer Engine vs local kernels on one GPU: same weights, same logits and gradients.

GPT (LayerNorm, gelu, biases, MHA) and Llama (RMSNorm, SwiGLU, GQA, RoPE) are built from the TE
and the local spec with the same seed; the TP-invariant initialisation gives both the same
weights (checked bit-exact through the key map).

fp32: TE runs every fp32 GEMM in TF32 (hard-wired in its cuBLASLt call, no switch), so the local
model is run at the same GEMM precision (``allow_tf32``) with the math SDPA backend (TE's fp32
attention is its unfused, torch-bmm path). Measured on an H200 (TE 2.20.2, torch 2.11): the two
differ by ~1e-4 at |logits| ~ 1, the size of TF32 rounding itself, so the issue's 1e-5 fp32 bound is
out of reach for TE; the test asserts TE is no further from the local TF32 model than 2x the local
TF32 model's own distance to full fp32 (and prints every figure).
bf16: both models in bf16; TE's error against an fp32 reference must be within 2x the local
bf16 model's error (+ a small floor), and the logits within bf16 tolerance of each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_core.extensions.te_key_map import te_to_local_state_dict
from megatron_core.extensions.te_usability import te_version
from tests.extensions._te_models import FAMILIES, batch, build

pytestmark = pytest.mark.cuda


@contextlib.contextmanager
def tf32_math_attention(enabled: bool) -> Iterator[None]:
    """Run torch GEMMs in TF32 (as TE does for fp32) and SDPA on its math (bmm) backend."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _run(model: torch.nn.Module, te: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``[b, s, vocab]`` (fp32 copy) and gradients of a fixed loss, under local names."""
    model.zero_grad(set_to_none=True)
    ids, positions = batch(device="cuda")
    logits = model(ids, positions, None)
    logits.float().square().mean().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), te_to_local_state_dict(grads) if te else grads


def _max_rel_grad_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert actual.keys() == expected.keys()
    worst, name = 0.0, ""
    for key, grad in expected.items():
        err = ((actual[key] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)).item()
        if err > worst:
            worst, name = err, key
    return worst, name


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_grads_match(family: str) -> None:
    local, te_model = build(family, "local", seed=11, device="cuda"), build(family, "te", seed=11, device="cuda")
    local_sd, te_sd = local.state_dict(), te_to_local_state_dict(te_model.state_dict())
    assert all(torch.equal(te_sd[k].cpu(), local_sd[k].cpu()) for k in local_sd), "same seed, same weights"

    with tf32_math_attention(True):
        logits_local, grads_local = _run(local, te=False)
        logits_te, grads_te = _run(te_model, te=True)
    with tf32_math_attention(False):
        logits_full, _ = _run(local, te=False)
    diff = (logits_te - logits_local).abs().max().item()
    # TE runs fp32 GEMMs in TF32 with no switch (checked: TE 2.20.2 on an H200), so two TF32 models
    # differ by TF32 rounding in summation order, ~1e-4 at |logits| ~ 1, never 1e-5. The bound: TE is
    # no further from the local TF32 model than TF32 itself is from full fp32.
    tf32_gap = (logits_local - logits_full).abs().max().item()
    grad_err, worst = _max_rel_grad_error(grads_te, grads_local)
    print(f"\n[{family} fp32, TE {te_version()}, torch {torch.__version__}, {torch.cuda.get_device_name()}] "
          f"max|logits TE - local(TF32)| = {diff:.3e}; max|logits TE - local(full fp32)| = "
          f"{(logits_te - logits_full).abs().max().item():.3e}; max|local(TF32) - local(fp32)| = {tf32_gap:.3e}; "
          f"|logits| max {logits_local.abs().max().item():.3f}; "
          f"worst grad rel. error {grad_err:.3e} ({worst})")
    assert diff <= max(1e-5, 2.0 * tf32_gap)
    assert grad_err <= 1e-3, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_and_grads_within_bf16_tolerance(family: str) -> None:
    reference = build(family, "local", seed=12, device="cuda")  # fp32, full precision
    with tf32_math_attention(False):
        logits_ref, grads_ref = _run(reference, te=False)
    bf16 = dict(params_dtype="bfloat16", bf16=True)
    logits_local, grads_local = _run(build(family, "local", seed=12, device="cuda", **bf16), te=False)
    logits_te, grads_te = _run(build(family, "te", seed=12, device="cuda", **bf16), te=True)
    scale = logits_ref.abs().max().item()
    err_local = (logits_local - logits_ref).abs().max().item()
    err_te = (logits_te - logits_ref).abs().max().item()
    print(f"\n[{family} bf16] |logits| max {scale:.3f}; max error vs fp32: local {err_local:.3e}, TE {err_te:.3e}; "
          f"max|TE - local| {(logits_te - logits_local).abs().max().item():.3e}")
    assert err_te <= 2 * err_local + 1e-3 * scale
    torch.testing.assert_close(logits_te, logits_local, rtol=1.6e-2, atol=2e-2 * max(scale, 1e-3))
    for name, grad in grads_ref.items():  # TE's bf16 gradients are as close to fp32 as the local ones
        ref_scale = grad.abs().max().clamp_min(1e-12)
        grad_err_local = ((grads_local[name] - grad).abs().max() / ref_scale).item()
        grad_err_te = ((grads_te[name] - grad).abs().max() / ref_scale).item()
        assert grad_err_te <= 2 * grad_err_local + 1e-2, (name, grad_err_te, grad_err_local)
