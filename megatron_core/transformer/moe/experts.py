"""The experts of an MoE layer: ``SequentialMLP`` (one MLP per expert) and ``GroupedMLP``.

Both compute, for the tokens of local expert ``e`` with combine weights ``w``,
``fc2_e(act(fc1_e(x)) * w)`` (Megatron-Core applies the weight before ``fc2``; identical to
weighting the output when there is no ``fc2`` bias, which is then added unweighted).

State-dict names are Megatron-Core's local-spec ones for both:
``local_experts.{e}.linear_fc1.weight`` / ``linear_fc2.weight`` with ``e`` the *local* index. In
``sharded_state_dict`` the key uses the *global* expert index (``ep_rank * n_local + e``) and the
replica id's data-parallel component is the expert-data-parallel rank, so a checkpoint saved at one
expert-parallel size loads at any other.

Initialisation is EP-invariant: every rank draws the weights of *all* global experts from the
default RNG in order and keeps its own, so a seed gives the same experts at any EP size (and the
RNG stream after the layer is the same too).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import (
    RankOffset,
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.utils import _leaves, replace_prefix_for_sharding


class ExpertsInterface(Protocol):
    """What the MoE layer needs from its built experts.

    ``forward(tokens [N, h], tokens_per_expert, probs [N]) -> (output [N, h], None)``: the tokens are
    the same on every TP rank; under TP > 1 the output is this rank's *partial sum* of fc2's
    contraction (Megatron-Core's explicit expert communication): the MoE layer reduces over TP once,
    after the tokens are back (all-reduce, or reduce-scatter along the sequence with sequence
    parallelism), on ``T`` rows instead of the ``T * k`` routed copies.
    """

    def forward(
        self, permuted_tokens: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor, /
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class ExpertsBuilder(Protocol):
    """Constructor call the MoE layer makes for its ``experts`` slot."""

    def __call__(self, num_local_experts: int, /, *, config: TransformerConfig) -> ExpertsInterface: ...


def local_expert_offset(num_local_experts: int) -> int:
    """Global index of this rank's first expert."""
    return parallel_state.get_expert_model_parallel_rank() * num_local_experts


def expert_sharded_state_dict(
    module: MegatronModule, num_local_experts: int, prefix: str, sharded_offsets: tuple[RankOffset, ...],
    metadata: dict[str, Any] | None,
) -> ShardedStateDict:
    """``local_experts.{e}`` entries keyed by global expert index, replicated over expert-DP only."""
    offset = local_expert_offset(num_local_experts)
    edp_rank = parallel_state.get_expert_data_parallel_rank()
    out: ShardedStateDict = {}
    for e in range(num_local_experts):
        local_prefix = f"{prefix}local_experts.{e}."
        sub = _local_expert_sharded(module, e, local_prefix, sharded_offsets, metadata)
        replace_prefix_for_sharding(sub, local_prefix, f"{prefix}local_experts.{offset + e}.")
        for leaf in _leaves(sub):
            if isinstance(leaf, (ShardedTensor, ShardedTensorFactory, ShardedObject)):
                leaf.replica_id = _with_edp_rank(leaf.replica_id, edp_rank)
        out.update(sub)
    return out


def _local_expert_sharded(
    module: MegatronModule, e: int, prefix: str, sharded_offsets: tuple[RankOffset, ...],
    metadata: dict[str, Any] | None,
) -> ShardedStateDict:
    expert: MegatronModule = module.local_experts[e]  # type: ignore[index, assignment]
    return expert.sharded_state_dict(prefix, sharded_offsets, metadata)


def _with_edp_rank(replica_id: Any, edp_rank: int) -> Any:
    # Megatron-Core's replica id is (pipeline, tp, dp); an expert is copied over expert-DP ranks only.
    if isinstance(replica_id, tuple) and len(replica_id) == 3:
        return (replica_id[0], replica_id[1], edp_rank)
    return replica_id


def _build_all_then_keep_local(num_local_experts: int, build: Any) -> list[torch.nn.Module]:
    """Build every global expert in order (same RNG draws at any EP), keep this rank's."""
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    offset = local_expert_offset(num_local_experts)
    kept = []
    for g in range(num_local_experts * ep_size):
        expert = build()
        if offset <= g < offset + num_local_experts:
            kept.append(expert)
        else:
            del expert
    return kept


class SequentialMLP(MegatronModule):
    """One ``MLP`` per local expert, run one after the other on its slice of the tokens.

    Args:
        num_local_experts: experts held by this rank (``num_moe_experts / EP``).
        config: the TransformerConfig (``moe_ffn_hidden_size`` is each expert's inner width).
        submodules: the expert MLP's linears (``MLPSubmodules``).
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules: MLPSubmodules) -> None:
        super().__init__(config)
        self.num_local_experts = num_local_experts
        experts = _build_all_then_keep_local(
            num_local_experts,
            lambda: MLP(config, submodules, is_expert=True, ffn_hidden_size=config.moe_ffn_hidden_size),
        )
        self.local_experts: list[MLP] = torch.nn.ModuleList(experts)  # type: ignore[assignment]

    def forward(
        self, permuted_tokens: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, h]`` grouped by local expert -> ``[N, h]`` weighted expert outputs (partial over TP)."""
        counts = [int(c) for c in tokens_per_expert.tolist()]
        outputs = []
        for expert, tokens, probs in zip(self.local_experts, permuted_tokens.split(counts),
                                         permuted_probs.split(counts), strict=True):
            outputs.append(_expert_forward(expert, tokens, probs))
        return torch.cat(outputs, dim=0), None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (), metadata: dict[str, Any] | None = None
    ) -> ShardedStateDict:
        return expert_sharded_state_dict(self, self.num_local_experts, prefix, sharded_offsets, metadata)


def weights_for_tp_split(probs: torch.Tensor, tp_group: ProcessGroup | None) -> torch.Tensor:
    """The combine weights, about to scale a TP-split activation: their gradient is a partial sum on
    each TP rank (each holds part of the ffn dimension), so backward all-reduces it over TP."""
    if parallel_state.group_world_size(tp_group) == 1:
        return probs
    return copy_to_tensor_model_parallel_region(probs, tp_group)


def _expert_forward(expert: MLP, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``fc2(act(fc1(x)) * w) + b2``, fc2 left as this TP rank's partial sum (see ``ExpertsInterface``)."""
    intermediate, bias = expert.linear_fc1(tokens)  # [n, fc1/tp]; its input copy all-reduces the grad
    if bias is not None:
        intermediate = intermediate + bias
    probs = weights_for_tp_split(probs, expert.tp_group)
    intermediate = expert._activate(intermediate) * probs.unsqueeze(-1).to(intermediate.dtype)
    fc2 = expert.linear_fc2
    out = torch.nn.functional.linear(intermediate, fc2.weight)  # [n, h], partial sums over TP
    bias = fc2.bias
    if bias is None or bias.numel() == 0:  # TE linears keep an empty tensor when bias=False
        return out
    tp_group = expert.tp_group
    if parallel_state.group_world_size(tp_group) == 1:
        return out + bias
    # Counted once in the TP sum: added on TP rank 0; the copy all-reduces its gradient to every rank.
    if parallel_state.group_rank(tp_group) == 0:
        return out + copy_to_tensor_model_parallel_region(bias, tp_group)
    return out + 0.0 * copy_to_tensor_model_parallel_region(bias, tp_group)
