"""TopKRouter: scores every token against every expert and picks the top-k.

Routing of one token (``config.moe_router_score_function`` / ``moe_router_pre_softmax``), on fp32
logits ``l = x @ router.weight.T``:

* softmax, not pre-softmax (Mixtral; Qwen-MoE with ``norm_topk_prob``): ``top = topk(l)``,
  ``w = softmax(l[top])`` (= softmax over all experts, renormalised over the chosen k);
* softmax, pre-softmax (Qwen-MoE without ``norm_topk_prob``): ``p = softmax(l)``, ``w = p[topk(p)]``;
* sigmoid: ``p = sigmoid(l)``, ``w = p[topk(p)]``, divided by its sum when k > 1.

``moe_router_topk_scaling_factor`` then multiplies ``w``. With ``moe_expert_capacity_factor`` each
expert keeps at most ``ceil(T k / E * factor)`` tokens (``moe_token_drop_policy``). The aux / z
losses (see ``moe_utils``) are attached to the outputs so that they reach the loss's backward, and
are recorded (detached) in :attr:`TopKRouter.stats` for logging.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_capacity,
    expert_capacity,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    z_loss,
)


class RouterInterface(Protocol):
    """What the MoE layer needs from a built router."""

    def forward(self, input: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor]: ...


class RouterBuilder(Protocol):
    """Constructor call the MoE layer makes for its ``router`` slot."""

    def __call__(self, *, config: TransformerConfig) -> RouterInterface: ...


class RouterStats:
    """Detached per-layer routing statistics accumulated since the last ``reset``."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.aux_loss = 0.0
        self.z_loss = 0.0
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long)

    def add(self, aux: torch.Tensor | None, zl: torch.Tensor | None, tokens_per_expert: torch.Tensor) -> None:
        self.calls += 1
        self.aux_loss += float(aux.detach()) if aux is not None else 0.0
        self.z_loss += float(zl.detach()) if zl is not None else 0.0
        self.tokens_per_expert += tokens_per_expert.detach().cpu().long()


class TopKRouter(MegatronModule):
    """Linear router ``[h] -> [E]`` with top-k selection, optional capacity and load-balancing losses.

    Args:
        config: needs ``num_moe_experts`` and the ``moe_router_*`` fields.

    ``forward(x [T, h])`` returns ``(probs [T, E], routing_map [T, E] bool)``: the combine weight of
    each (token, expert) pair (0 where not routed) and which pairs are routed.
    """

    def __init__(self, *, config: TransformerConfig) -> None:
        super().__init__(config)
        if config.num_moe_experts is None:
            raise ValueError("TopKRouter: config.num_moe_experts is None; set num_moe_experts to build an MoE layer")
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.weight = torch.nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=config.torch_dtype))
        if config.perform_initialization:
            with torch.no_grad():
                master = torch.empty(self.weight.shape, dtype=torch.float32)
                config.init_method(master)
                self.weight.copy_(master)
        self.stats = RouterStats(self.num_experts)
        # Megatron's token order is [s, b] flattened; seq_aux_loss needs b. The MoE layer sets it.
        self.batch_size = 1
        # d(objective)/d(each attached loss), captured at forward; the Trainer sets 1 / micro-batches
        # for its step only (training.moe_metrics.aux_loss_scale).
        self.aux_loss_scale = 1.0

    def _scores_and_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights of the chosen [T, k], chosen expert ids [T, k], scores over all experts [T, E])."""
        if self.config.moe_router_score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            weights, top = torch.topk(scores, self.topk, dim=-1)
            if self.topk > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return weights, top, scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        scores = torch.softmax(logits, dim=-1)
        if self.config.moe_router_pre_softmax:
            weights, top = torch.topk(scores, self.topk, dim=-1)
        else:
            top_logits, top = torch.topk(logits, self.topk, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        return weights, top, scores

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, E]`` fp32 logits -> ``(probs [T, E], routing_map [T, E])`` with losses attached."""
        config = self.config
        zl = None
        if config.moe_z_loss_coeff and self.training:
            zl = z_loss(logits, config.moe_z_loss_coeff)
            logits = MoEAuxLossAutoScaler.apply(logits, zl, self.aux_loss_scale)
        weights, top, scores = self._scores_and_topk(logits)
        if config.moe_router_topk_scaling_factor is not None:
            weights = weights * config.moe_router_topk_scaling_factor
        probs = torch.zeros_like(logits).scatter(1, top, weights)  # [T, E]
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
        tokens_per_expert = routing_map.sum(dim=0)  # before drops: what the balance losses measure
        aux = self._aux_loss(scores, routing_map, tokens_per_expert)
        if aux is not None:
            probs = MoEAuxLossAutoScaler.apply(probs, aux, self.aux_loss_scale)
        if config.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(logits.shape[0], self.num_experts, self.topk, config.moe_expert_capacity_factor)
            probs, routing_map = apply_capacity(probs, routing_map, capacity, config.moe_token_drop_policy)
        self.stats.add(aux, zl, routing_map.sum(dim=0))
        return probs, routing_map

    def _aux_loss(
        self, scores: torch.Tensor, routing_map: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor | None:
        config = self.config
        if not self.training or config.moe_aux_loss_coeff == 0:
            return None
        if config.moe_router_load_balancing_type == "aux_loss":
            return switch_load_balancing_loss(scores, tokens_per_expert.to(scores.dtype), self.topk,
                                              config.moe_aux_loss_coeff)
        if config.moe_router_load_balancing_type == "seq_aux_loss":
            return sequence_load_balancing_loss(scores, routing_map, self.batch_size, self.topk,
                                                config.moe_aux_loss_coeff)
        return None

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, h]`` -> ``(probs [T, E] fp32, routing_map [T, E] bool)``."""
        logits = torch.nn.functional.linear(input.float(), self.weight.float())  # [T, E] in fp32
        return self.routing(logits)
