"""The MoE MLP spec: ``TopKRouter`` + ``SequentialMLP`` (or ``GroupedMLP``) experts + ``SharedExpertMLP``.

Megatron-Core's ``get_moe_module_spec`` with local kernels. The shared expert is always in the spec;
``MoELayer`` builds it only when ``config.moe_shared_expert_intermediate_size`` is set (as
Megatron-Core does), so one spec serves Mixtral (no shared expert) and Qwen-MoE (one, gated).

Swapping a part is one line, e.g. a custom router::

    spec = get_moe_module_spec()
    spec.submodules.router = MyRouter          # checked against RouterBuilder at build time
"""

from __future__ import annotations

from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer.mlp import MLPSubmodules
from megatron_core.transformer.moe.experts import SequentialMLP
from megatron_core.transformer.moe.grouped_experts import GroupedMLP
from megatron_core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron_core.transformer.moe.router import TopKRouter
from megatron_core.transformer.moe.shared_experts import SharedExpertMLP
from megatron_core.transformer.spec_utils import ModuleSpec


def get_moe_module_spec(moe_grouped_gemm: bool = False) -> ModuleSpec:
    """The ``mlp`` slot of an MoE layer, from local kernels.

    Args:
        moe_grouped_gemm: ``GroupedMLP`` experts (one ``torch._grouped_mm`` per projection over all
            local experts) instead of ``SequentialMLP`` (a Python loop over the experts). Same
            state-dict names and checkpoint keys either way.
    """
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = ModuleSpec(module=GroupedMLP) if moe_grouped_gemm else \
        ModuleSpec(module=SequentialMLP, submodules=linears)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            router=TopKRouter,
            experts=experts,
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=linears),
        ),
    )
