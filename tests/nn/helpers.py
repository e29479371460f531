"""Shared helpers of the ``megatron_core.nn`` tests: torch.nn parity checks and TP result merging."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

ATOL = 1e-6


def torch_grads_in_our_layout(ours: torch.nn.Module, theirs: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torch.nn's parameter gradients, converted to our keys/layouts by our own ``load_state_dict``."""
    twin = copy.deepcopy(ours)
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in theirs.named_parameters()}
    twin.load_state_dict(grads)
    return {name: p.detach() for name, p in twin.named_parameters()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the reference's scale when that exceeds 1.

    fp32 cannot resolve 1e-6 absolute on values above ~8 (one ulp of 11 is 9.5e-7), and summed
    parameter gradients reach that size; below 1 this is the plain absolute difference.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    if not a.numel():
        return 0.0
    scale = max(1.0, float(b.double().abs().max()))
    return float((a.double() - b.double()).abs().max()) / scale


def check_parity(ours: torch.nn.Module, theirs: torch.nn.Module, call: Callable[[torch.nn.Module, list[torch.Tensor]], Any],
                 inputs: list[torch.Tensor], atol: float = ATOL) -> float:
    """Load ``theirs`` into ``ours``, run ``call`` on both, compare outputs, input and parameter grads.

    ``call(module, inputs)`` returns a tensor or a tuple whose first item is the output (extra tensor
    items, e.g. attention weights, are compared too). Returns the largest difference seen.
    """
    ours.load_state_dict(theirs.state_dict())
    worst = 0.0
    runs = []
    for module in (ours, theirs):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = call(module, xs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        loss.backward()
        runs.append((outs, [x.grad for x in xs if x.requires_grad]))
    (our_outs, our_grads), (their_outs, their_grads) = runs
    for a, b in zip(our_outs, their_outs, strict=True):
        worst = max(worst, max_diff(a.detach(), b.detach()))
    for a, b in zip(our_grads, their_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:  # an input the call did not use has no gradient on either side
            worst = max(worst, max_diff(a, b))
    expected = torch_grads_in_our_layout(ours, theirs)
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        worst = max(worst, max_diff(p.grad, expected[name]))
    assert worst <= atol, f"max difference {worst:.3g} > {atol}"
    return worst


def merge_ranks(per_rank: list[dict[str, tuple[torch.Tensor, int | None]]]) -> dict[str, torch.Tensor]:
    """``{name: (local tensor, split dim or None)}`` from every rank -> full tensors.

    Replicated tensors must agree on every rank; split ones are concatenated in rank order.
    """
    merged = {}
    for name, (tensor, dim) in per_rank[0].items():
        if dim is None:
            for other in per_rank[1:]:
                assert torch.allclose(other[name][0], tensor, atol=1e-6, rtol=0), f"{name} differs across ranks"
            merged[name] = tensor
        else:
            merged[name] = torch.cat([r[name][0] for r in per_rank], dim=dim)
    return merged


def local_grads(module: torch.nn.Module, prefix: str) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Each parameter's local gradient with its TP split dim (None when replicated)."""
    out = {}
    for name, p in module.named_parameters():
        split = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None  # type: ignore[attr-defined]
        assert p.grad is not None, name
        out[f"{prefix}{name}.grad"] = (p.grad.detach().clone(), split)
    return out
