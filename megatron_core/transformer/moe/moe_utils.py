"""Router losses, capacity, token permutation and the aux-loss gradient hook of the MoE layer.

Load-balancing losses (Megatron-Core's per-layer definitions; ``T`` tokens, ``E`` experts, top-``k``,
``p[t, e]`` the router scores over *all* experts, ``c[e]`` the tokens routed to expert ``e`` before
any capacity drop)::

    aux_loss     = coeff * E / (k * T^2) * sum_e (sum_t p[t, e]) * c[e]
    seq_aux_loss = mean over sequences of aux_loss computed on that sequence's tokens alone
    z_loss       = coeff * mean_t logsumexp(logits[t])^2

Hugging Face's ``load_balancing_loss_func`` is ``E * sum_e mean_t(p[t, e]) * c[e] / T`` over the
tokens of *all layers at once*: per layer it is ``k`` times ours (without the coefficient).

The losses do not travel through the model outputs: ``MoEAuxLossAutoScaler`` attaches each one to
an activation so that ``loss.backward()`` also back-propagates ``scale * d(aux)/d(params)``, which
works across pipeline stages (Megatron-Core's mechanism). The weight of that gradient is given at
forward time (``TopKRouter.aux_loss_scale``, 1 by default) and kept with the graph, instead of
Megatron-Core's process-wide ``main_loss_backward_scale``: a global would leak from one model (or one
training loop) into every other model of the process, and could change between a forward and its
backward. The training loop sets it on the routers of the model it trains, for the step only
(``training.moe_metrics.aux_loss_scale``).
"""

from __future__ import annotations

import math
from typing import Any

import torch


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends ``scale`` (as d(loss)/d(aux_loss)) into ``aux_loss``.

    ``MoEAuxLossAutoScaler.apply(output, aux_loss, scale=1.0)``: the scale is fixed at forward time.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = float(scale)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def switch_load_balancing_loss(
    scores: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int, coeff: float
) -> torch.Tensor:
    """Megatron-Core's aux loss of one layer: ``coeff * E / (k T^2) * sum_e (sum_t p[t,e]) c[e]``.

    Args:
        scores: ``[T, E]`` router scores over all experts (fp32).
        tokens_per_expert: ``[E]`` tokens routed to each expert (before capacity drops).
        topk: experts per token.
        coeff: ``moe_aux_loss_coeff``.
    """
    num_tokens, num_experts = scores.shape
    return torch.sum(scores.sum(dim=0) * tokens_per_expert) * (
        num_experts * coeff / (topk * num_tokens * num_tokens)
    )


def sequence_load_balancing_loss(
    scores: torch.Tensor, routing_map: torch.Tensor, batch_size: int, topk: int, coeff: float
) -> torch.Tensor:
    """The aux loss computed per sequence and averaged over the ``batch_size`` sequences.

    Args:
        scores: ``[s * b, E]`` in Megatron's token order (sequence-major: token ``i*b + j`` is
            position ``i`` of sequence ``j``).
        routing_map: ``[s * b, E]`` bool, before capacity drops.
    """
    num_tokens, num_experts = scores.shape
    seq_len = num_tokens // batch_size
    per_seq_scores = scores.view(seq_len, batch_size, num_experts).sum(dim=0)  # [b, E]
    per_seq_counts = routing_map.view(seq_len, batch_size, num_experts).sum(dim=0).to(scores.dtype)
    per_seq = (per_seq_scores * per_seq_counts).sum(dim=1)  # [b]
    return per_seq.mean() * (num_experts * coeff / (topk * seq_len * seq_len))


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE's router z-loss: ``coeff * mean_t logsumexp(logits[t])^2``."""
    return torch.logsumexp(logits, dim=-1).square().mean() * coeff


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ``ceil(T * k / E * capacity_factor)`` (Megatron-Core's formula)."""
    return int(math.ceil(num_tokens * topk / num_experts * capacity_factor))


def apply_capacity(
    probs: torch.Tensor, routing_map: torch.Tensor, capacity: int, drop_policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop what overflows each expert's ``capacity``.

    ``drop_policy="probs"`` keeps, per expert, the ``capacity`` routed tokens with the highest
    probability; ``"position"`` keeps the first ``capacity`` routed tokens in token order.

    Args:
        probs: ``[T, E]`` combine weights (0 where not routed).
        routing_map: ``[T, E]`` bool.

    Returns:
        ``(probs, routing_map)`` with dropped entries zeroed / cleared.
    """
    num_tokens = probs.shape[0]
    if capacity >= num_tokens:
        return probs, routing_map
    if drop_policy == "position":
        keep = routing_map & (routing_map.long().cumsum(dim=0) <= capacity)
    else:
        # -1 for unrouted entries: a routed token always outranks an unrouted one.
        ranked = torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
        top = torch.topk(ranked, k=capacity, dim=0).indices  # [capacity, E]
        keep = torch.zeros_like(routing_map).scatter(0, top, True) & routing_map
    return probs * keep, keep


def permute(
    tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather a copy of each token for each expert it is routed to, grouped by expert.

    Args:
        tokens: ``[T, h]``.
        routing_map: ``[T, E]`` bool.
        probs: ``[T, E]``.

    Returns:
        ``(permuted [N, h], permuted_probs [N], token_index [N])``, expert-major then token order,
        ``N = routing_map.sum()``; ``token_index`` maps each row back to its token.
    """
    expert_index, token_index = routing_map.t().nonzero(as_tuple=True)  # sorted by expert, then token
    return tokens.index_select(0, token_index), probs[token_index, expert_index], token_index


def unpermute(expert_output: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs back into ``[num_tokens, h]`` (probs already applied)."""
    out = torch.zeros(num_tokens, expert_output.shape[-1], dtype=expert_output.dtype, device=expert_output.device)
    return out.index_add(0, token_index, expert_output)
