"""MoELayer: router -> token dispatcher -> experts -> dispatcher back, plus an optional shared expert.

Built from ``MoESubmodules(router, experts, shared_experts)`` specs, like every other slot: a
custom router or expert module is one line in a spec and is checked against ``RouterBuilder`` /
``ExpertsBuilder`` when the model is built. The layer fills the ``mlp`` slot of a
``TransformerLayer`` and returns ``(output, None)`` like the dense ``MLP``.

Expert parallelism: ``num_moe_experts / expert_model_parallel_size`` experts live on each rank
(global experts ``ep_rank * n_local ... + n_local - 1``); the dispatcher
(``config.moe_token_dispatcher_type``) moves the tokens.

Tensor parallelism: the experts return TP-partial sums of fc2 (see ``ExpertsInterface``); the layer
reduces them once, after the tokens are back: an all-reduce of ``[T, h]`` rather than of the
``T * k`` routed copies.

Sequence parallelism (TP > 1): the layer's input is this TP rank's sequence chunk ``[s/tp, b, h]``.
The layer all-gathers the sequence over TP once, routes, dispatches and runs the experts on the whole
sequence (every TP rank holds the same tokens; the router, dispatcher and experts are built with
``sequence_parallel=False``, so the experts' linears do not gather a second time), and
reduce-scatters the experts' partial outputs along the sequence back to ``[s/tp, b, h]``. The shared
expert is an ordinary sequence-parallel MLP on the layer's input (it gathers and reduce-scatters
itself). Backward: the gather keeps this rank's slice of the (complete, replicated) input gradient.
Routing, capacity and the aux losses see the whole sequence, as at TP=1. (Megatron-Core routes each
rank's own tokens instead; this layout keeps routing identical at every TP/SP layout.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_core.transformer.moe.experts import ExpertsBuilder
from megatron_core.transformer.moe.router import RouterBuilder
from megatron_core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
    MoETokenDispatcher,
)
from megatron_core.transformer.spec_utils import ModuleSpec, build_module


@dataclass
class MoESubmodules:
    """Specs of the MoE layer's slots.

    ``shared_experts`` is built only when ``config.moe_shared_expert_intermediate_size`` is set.
    """

    router: ModuleSpec | type | RouterBuilder
    experts: ModuleSpec | type | ExpertsBuilder
    shared_experts: ModuleSpec | type | None = None


class MoELayer(MegatronModule):
    """Mixture-of-experts MLP.

    Args:
        config: the TransformerConfig (``num_moe_experts``, ``moe_*``, ``expert_model_parallel_size``).
        submodules: ``MoESubmodules``.
        layer_number: 1-based global layer index (for logging).
    """

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules, layer_number: int | None = None) -> None:
        super().__init__(config)
        if config.num_moe_experts is None:
            raise ValueError("MoELayer: config.num_moe_experts is None; set num_moe_experts or use a dense MLP spec")
        ep_size = parallel_state.get_expert_model_parallel_world_size()  # = the config's: checked by the base
        self.layer_number = layer_number
        self.num_local_experts = config.num_moe_experts // ep_size
        offset = parallel_state.get_expert_model_parallel_rank() * self.num_local_experts
        self.local_expert_indices = list(range(offset, offset + self.num_local_experts))
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.group_world_size(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        # The sequence is gathered once here: router and experts see whole sequences (module docstring).
        inner = config.model_copy(update={"sequence_parallel": False}) if config.sequence_parallel else config
        self.router = build_module(submodules.router, config=inner)
        self.experts = build_module(submodules.experts, self.num_local_experts, config=inner)
        self.shared_experts: torch.nn.Module | None = None
        # As in Megatron-Core the spec always names a shared expert; the config decides whether there is one.
        if submodules.shared_experts is not None and config.moe_shared_expert_intermediate_size is not None:
            self.shared_experts = build_module(submodules.shared_experts, config=config)  # SP itself
        dispatcher_cls = {"allgather": MoEAllGatherTokenDispatcher,
                          "alltoall": MoEAlltoAllTokenDispatcher}[config.moe_token_dispatcher_type]
        self.token_dispatcher: MoETokenDispatcher = dispatcher_cls(
            self.num_local_experts, self.local_expert_indices, inner
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``[s, b, h]`` -> ``([s, b, h], None)`` (``[s/tp, b, h]`` in and out with sequence parallelism)."""
        layer_input = hidden_states
        if self.sequence_parallel:
            # [s/tp, b, h] -> [s, b, h]; backward keeps this rank's slice of the replicated gradient
            hidden_states = gather_from_sequence_parallel_region(hidden_states, False, self.tp_group)
        seq, batch, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # [s*b, h], Megatron's token order
        if hasattr(self.router, "batch_size"):
            self.router.batch_size = batch
        probs, routing_map = self.router(tokens)
        dispatched, tokens_per_expert, dispatched_probs = self.token_dispatcher.token_permutation(
            tokens, probs, routing_map
        )
        expert_output, _ = self.experts(dispatched, tokens_per_expert, dispatched_probs)
        output = self.token_dispatcher.token_unpermutation(expert_output).to(hidden_states.dtype)
        output = output.view(seq, batch, hidden)  # partial sums over TP
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output, self.tp_group)  # -> [s/tp, b, h]
        elif self.tp_size > 1:
            output = reduce_from_tensor_model_parallel_region(output, self.tp_group)
        if self.shared_experts is not None:
            shared, _ = self.shared_experts(layer_input)  # [s/tp, b, h] in and out with SP
            output = output + shared
        return output, None

    def extra_repr(self) -> str:
        return (f"experts={self.config.num_moe_experts}, local={self.local_expert_indices}, "
                f"topk={self.config.moe_router_topk}, dispatcher={self.config.moe_token_dispatcher_type}")

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number


def moe_layers(model: torch.nn.Module) -> list[Any]:
    """Every ``MoELayer`` inside ``model`` (in module order)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]
