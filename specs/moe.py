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
from specs.common import TE_COLUMN_PARALLEL_LINEAR, TE_ROW_PARALLEL_LINEAR


def get_moe_module_spec(moe_grouped_gemm: bool = False, use_te: bool = False) -> ModuleSpec:
    """The ``mlp`` slot of an MoE layer, from local kernels (or TE linears).

    Args:
        moe_grouped_gemm: ``GroupedMLP`` experts (one ``torch._grouped_mm`` per projection over all
            local experts) instead of ``SequentialMLP`` (a Python loop over the experts). Same
            state-dict names and checkpoint keys either way.
        use_te: the experts' and the shared expert's linears are Transformer Engine's
            (``TEColumnParallelLinear`` / ``TERowParallelLinear``); ``SequentialMLP`` only.

    Raises:
        NotImplementedError: ``use_te`` with ``moe_grouped_gemm`` (no TE grouped linear here).
    """
    if use_te and moe_grouped_gemm:
        raise NotImplementedError(
            "get_moe_module_spec(moe_grouped_gemm=True, use_te=True): there is no TE grouped-GEMM expert module "
            "here; use moe_grouped_gemm=False (SequentialMLP with TE linears) or the local spec's GroupedMLP"
        )
    if use_te:
        linears = MLPSubmodules(linear_fc1=ModuleSpec(module=TE_COLUMN_PARALLEL_LINEAR),
                                linear_fc2=ModuleSpec(module=TE_ROW_PARALLEL_LINEAR))
    else:
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
