"""TopKRouter against formulas written out by hand: score functions, top-k, scaling, capacity, losses."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_core.transformer.moe import TopKRouter
from tests.transformer.moe.moe_harness import moe_config

E, K, T, H = 8, 2, 24, 32


def _router(**overrides) -> TopKRouter:
    fields = dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    fields.update(overrides)
    return TopKRouter(config=moe_config(**fields))


def test_softmax_topk_then_softmax_is_renormalised_full_softmax():
    router = _router()
    x = torch.randn(T, H)
    probs, routing_map = router(x)
    logits = x @ router.weight.detach().T
    full = torch.softmax(logits, -1)
    top = full.topk(K, -1).indices
    expected = torch.zeros(T, E).scatter(1, top, full.gather(1, top) / full.gather(1, top).sum(-1, keepdim=True))
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert torch.equal(routing_map, expected > 0)


@pytest.mark.parametrize("score,pre,scale", [("softmax", True, None), ("softmax", True, 2.5), ("sigmoid", False, None)])
def test_pre_softmax_sigmoid_and_scaling(score, pre, scale):
    router = _router(moe_router_score_function=score, moe_router_pre_softmax=pre,
                     moe_router_topk_scaling_factor=scale)
    x = torch.randn(T, H)
    probs, _ = router(x)
    logits = x @ router.weight.detach().T
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    vals, top = scores.topk(K, -1)
    if score == "sigmoid":
        vals = vals / vals.sum(-1, keepdim=True)
    vals = vals * (scale or 1.0)
    torch.testing.assert_close(probs, torch.zeros(T, E).scatter(1, top, vals), atol=1e-6, rtol=0)


def _capacity_reference(probs: torch.Tensor, routing_map: torch.Tensor, factor: float, policy: str) -> torch.Tensor:
    """From the definition: each expert keeps ceil(T k / E * factor) of its tokens, by prob or by position."""
    capacity = math.ceil(T * K / E * factor)
    keep = torch.zeros_like(routing_map)
    for e in range(E):
        tokens = [t for t in range(T) if routing_map[t, e]]
        if policy == "probs":
            tokens = sorted(tokens, key=lambda t: -probs[t, e].item())
        for t in tokens[:capacity]:
            keep[t, e] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_match_the_definition(policy, factor):
    x = torch.randn(T, H)
    dropless = _router()
    probs, routing_map = dropless(x)
    capped = _router(moe_expert_capacity_factor=factor, moe_token_drop_policy=policy)
    capped.load_state_dict(dropless.state_dict())
    probs_c, map_c = capped(x)
    keep = _capacity_reference(probs.detach(), routing_map, factor, policy)
    assert keep.sum() < routing_map.sum()  # something was dropped
    assert torch.equal(map_c, keep)
    torch.testing.assert_close(probs_c, probs * keep, atol=0, rtol=0)


def test_aux_and_z_loss_gradients_reach_the_router_weight():
    coeff, zcoeff = 0.05, 0.01
    router = _router(moe_aux_loss_coeff=coeff, moe_z_loss_coeff=zcoeff).train()
    x = torch.randn(T, H)
    probs, _ = router(x)
    (probs * 0).sum().backward()  # the main loss contributes nothing: only the attached losses
    got = router.weight.grad.clone()

    w = router.weight.detach().clone().requires_grad_(True)
    logits = x @ w.T
    scores = torch.softmax(logits, -1)
    counts = torch.zeros(T, E).scatter(1, logits.topk(K, -1).indices, 1.0).sum(0)
    aux = coeff * E / (K * T * T) * (scores.sum(0) * counts).sum()
    z = zcoeff * torch.logsumexp(logits, -1).square().mean()
    (aux + z).backward()
    torch.testing.assert_close(got, w.grad, atol=1e-7, rtol=1e-5)
    assert router.stats.aux_loss == pytest.approx(aux.item(), rel=1e-5)
    assert router.stats.z_loss == pytest.approx(z.item(), rel=1e-5)


def test_seq_aux_loss_is_the_mean_of_per_sequence_aux_losses():
    coeff, b, s = 0.1, 3, 8
    router = _router(moe_aux_loss_coeff=coeff, moe_router_load_balancing_type="seq_aux_loss").train()
    router.batch_size = b
    x = torch.randn(s * b, H)  # Megatron's [s, b] token order
    router(x)
    logits = (x @ router.weight.detach().T).view(s, b, E)
    expected = 0.0
    for j in range(b):
        seq = logits[:, j]
        counts = torch.zeros(s, E).scatter(1, seq.topk(K, -1).indices, 1.0).sum(0)
        expected += coeff * E / (K * s * s) * (torch.softmax(seq, -1).sum(0) * counts).sum().item() / b
    assert router.stats.aux_loss == pytest.approx(expected, rel=1e-5)


def test_loss_scale_multiplies_the_attached_gradient():
    router = _router(moe_aux_loss_coeff=0.05).train()
    x = torch.randn(T, H)
    router(x)[0].sum().mul(0).backward()
    once = router.weight.grad.clone()
    router.zero_grad()
    router.aux_loss_scale = 0.25
    router(x)[0].sum().mul(0).backward()
    torch.testing.assert_close(router.weight.grad, once * 0.25)
    # the scale is the one at forward time, whatever it is when backward runs
    router.zero_grad()
    router.aux_loss_scale = 0.5
    out = router(x)[0]
    router.aux_loss_scale = 1.0
    out.sum().mul(0).backward()
    torch.testing.assert_close(router.weight.grad, once * 0.5)
