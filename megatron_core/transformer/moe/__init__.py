"""Mixture of experts: ``MoELayer`` built from router / experts / shared-expert specs."""

from megatron_core.transformer.moe.experts import ExpertsBuilder, ExpertsInterface, SequentialMLP
from megatron_core.transformer.moe.moe_layer import MoELayer, MoESubmodules, moe_layers
from megatron_core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron_core.transformer.moe.router import RouterBuilder, RouterInterface, TopKRouter
from megatron_core.transformer.moe.shared_experts import SharedExpertMLP
from megatron_core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

__all__ = [
    "ExpertsBuilder",
    "ExpertsInterface",
    "MoEAllGatherTokenDispatcher",
    "MoEAlltoAllTokenDispatcher",
    "MoEAuxLossAutoScaler",
    "MoELayer",
    "MoESubmodules",
    "RouterBuilder",
    "RouterInterface",
    "SequentialMLP",
    "SharedExpertMLP",
    "TopKRouter",
    "moe_layers",
]
