"""Token dispatchers: bring each token to the rank holding its expert, and the results back.

Both take the router's ``probs`` / ``routing_map`` ``[T, E]`` and this rank's tokens ``[T, h]``, and
hand the experts ``(tokens [N, h] grouped by local expert, tokens_per_expert [n_local],
probs [N])``; ``token_unpermutation`` turns the experts' ``[N, h]`` back into ``[T, h]``.

* ``MoEAllGatherTokenDispatcher`` (``moe_token_dispatcher_type="allgather"``): all-gather every EP
  rank's tokens, keep those routed to local experts, reduce-scatter the results. Simple; moves
  ``EP x`` all tokens.
* ``MoEAlltoAllTokenDispatcher`` (``"alltoall"``): send each (token, expert) copy only to the rank
  of its expert with ``all_to_all_single`` (gloo and NCCL both have it), and back the same way.

Tensor parallelism: without sequence parallelism every TP rank holds the same tokens, so each
rank exchanges with the ranks of its own EP group (same TP index) and the experts' TP-split linears
do their usual TP reductions; nothing else is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_core.transformer.moe.moe_utils import permute, unpermute


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _AllToAll.apply(grad.contiguous(), ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


def all_to_all(group: ProcessGroup, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: send ``in_splits[r]`` rows to rank r, receive ``out_splits[r]``."""
    return _AllToAll.apply(x, group, out_splits, in_splits)


class MoETokenDispatcher:
    """Shared state: the EP group and which global experts live here."""

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config: TransformerConfig) -> None:
        self.config = config
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        assert config.num_moe_experts is not None
        self.num_experts = config.num_moe_experts
        self.ep_size = parallel_state.get_expert_model_parallel_world_size()
        self.ep_group = parallel_state.get_expert_model_parallel_group()
        self._state: dict[str, Any] = {}

    def token_permutation(
        self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def token_unpermutation(self, expert_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MoEAllGatherTokenDispatcher(MoETokenDispatcher):
    """All-gather tokens over the EP group; each rank computes its experts' share; reduce-scatter back."""

    def token_permutation(
        self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens = hidden_states.shape[0]
        if self.ep_size > 1:
            # [T, .] -> [EP*T, .]; backward reduce-scatters (the gathered rows feed other ranks' experts)
            hidden_states = gather_from_sequence_parallel_region(hidden_states, True, self.ep_group)
            probs = gather_from_sequence_parallel_region(probs, True, self.ep_group)
            with torch.no_grad():
                routing_map = gather_from_sequence_parallel_region(routing_map.to(torch.uint8), True,
                                                                   self.ep_group).bool()
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        local_map = routing_map[:, first:last]  # [EP*T, n_local]
        permuted, permuted_probs, token_index = permute(hidden_states, local_map, probs[:, first:last])
        self._state = {"token_index": token_index, "gathered_tokens": hidden_states.shape[0],
                       "num_tokens": num_tokens}
        return permuted, local_map.sum(dim=0), permuted_probs

    def token_unpermutation(self, expert_output: torch.Tensor) -> torch.Tensor:
        out = unpermute(expert_output, self._state["token_index"], self._state["gathered_tokens"])  # [EP*T, h]
        if self.ep_size > 1:
            out = reduce_scatter_to_sequence_parallel_region(out, self.ep_group)  # sum over EP -> [T, h]
        self._state = {}
        return out


class MoEAlltoAllTokenDispatcher(MoETokenDispatcher):
    """Send each routed copy to its expert's rank (``all_to_all_single``), sorted by local expert."""

    def token_permutation(
        self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens = hidden_states.shape[0]
        permuted, permuted_probs, token_index = permute(hidden_states, routing_map, probs)  # by global expert
        counts = routing_map.sum(dim=0)  # [E] copies this rank sends to each expert
        self._state = {"token_index": token_index, "num_tokens": num_tokens}
        if self.ep_size == 1:
            return permuted, counts, permuted_probs
        assert self.ep_group is not None
        gathered = [torch.empty_like(counts) for _ in range(self.ep_size)]
        dist.all_gather(gathered, counts, group=self.ep_group)
        all_counts = torch.stack(gathered)  # [EP source, E]
        in_splits = counts.view(self.ep_size, self.num_local_experts).sum(dim=1).tolist()
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        received = all_counts[:, first:last]  # [EP source, n_local]
        out_splits = received.sum(dim=1).tolist()
        tokens = all_to_all(self.ep_group, permuted, out_splits, in_splits)
        tokens_probs = all_to_all(self.ep_group, permuted_probs, out_splits, in_splits)
        # Received rows are source-major then local-expert; the experts want local-expert-major.
        order = _chunk_order(received)
        self._state.update(in_splits=in_splits, out_splits=out_splits, order=order)
        return tokens.index_select(0, order), received.sum(dim=0), tokens_probs.index_select(0, order)

    def token_unpermutation(self, expert_output: torch.Tensor) -> torch.Tensor:
        state = self._state
        if self.ep_size > 1:
            restored = torch.empty_like(expert_output).index_copy(0, state["order"], expert_output)
            assert self.ep_group is not None
            expert_output = all_to_all(self.ep_group, restored, state["in_splits"], state["out_splits"])
        out = unpermute(expert_output, state["token_index"], state["num_tokens"])
        self._state = {}
        return out


def _chunk_order(counts: torch.Tensor) -> torch.Tensor:
    """Row order that regroups ``counts [sources, experts]`` chunks from source-major to expert-major.

    Row ``i`` of the result is the index (in the source-major layout) of the ``i``-th row of the
    expert-major layout.
    """
    sources, experts = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, dim=0) - flat  # start of chunk (source, expert) in source-major order
    pieces = [torch.arange(int(starts[s * experts + e]), int(starts[s * experts + e] + flat[s * experts + e]))
              for e in range(experts) for s in range(sources)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
