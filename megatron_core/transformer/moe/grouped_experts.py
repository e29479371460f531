"""GroupedMLP: all local experts in one grouped GEMM per projection (``torch._grouped_mm``).

torch 2.13 has ``torch._grouped_mm`` on the CPU too (a private op; forward and backward): one call
multiplies each contiguous block of rows by its own expert's matrix. Its kernels need row strides
that are multiples of 16 bytes; when a width is not (or the op is missing, or ``torch.compile`` traces
a non-bf16 graph: the op's fake kernel takes bf16 only), the same maths runs as a loop of matmuls over
the experts. No biases (as Megatron-Core's ``GroupedMLP``).

The parameters are ``SequentialMLP``'s (one ``MLP`` per expert, same names, init, sharded state dict
and optimizer entries), so the two expert modules load each other's state dicts and checkpoints, and
the Megatron-Core fixture loads into both. To avoid copying them into a stacked ``[n_local, out, in]``
tensor every step, their storage is packed: each projection's expert weights are views of one
contiguous ``[n_local, out, in]`` tensor (at construction and after ``.to()``), and the forward takes
that tensor as a zero-copy view (:class:`_StackAdjacent`; its backward hands each expert its slice of
the gradient). When something has moved a weight elsewhere (e.g. a flat buffer of the distributed
optimizer), the forward falls back to ``torch.stack`` (same values, one copy).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_core.transformer.mlp import MLPSubmodules
from megatron_core.transformer.moe.experts import SequentialMLP, weights_for_tp_split

_GROUPED_MM = getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (grouped_mm rejects expanded grads)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _StackAdjacent(torch.autograd.Function):
    """``torch.stack(weights)`` without a copy, for weights already adjacent in one storage."""

    @staticmethod
    def forward(ctx: Any, *weights: torch.Tensor) -> torch.Tensor:
        first = weights[0]
        stacked = first.new_empty(0)
        return stacked.set_(first.untyped_storage(), first.storage_offset(), (len(weights), *first.shape),
                            (first.numel(), *first.stride()))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grad.unbind(0)


def _adjacent(weights: list[torch.Tensor]) -> bool:
    """Whether ``weights`` are contiguous, of one shape and dtype, back to back in one storage, in order."""
    first = weights[0]
    if not first.is_contiguous():
        return False
    ptr, numel = first.untyped_storage().data_ptr(), first.numel()
    return all(w.is_contiguous() and w.shape == first.shape and w.dtype == first.dtype
               and w.untyped_storage().data_ptr() == ptr and w.storage_offset() == first.storage_offset() + i * numel
               for i, w in enumerate(weights))


def stack_weights(weights: list[torch.Tensor]) -> torch.Tensor:
    """``[n, out, in]`` from ``n`` weights ``[out, in]``: a view when they are packed, else a copy."""
    if not torch.compiler.is_compiling() and _adjacent(weights):  # storage tricks stay out of compiled graphs
        return _StackAdjacent.apply(*weights)
    return torch.stack(weights)


@torch.no_grad()
def pack_weights(weights: list[torch.nn.Parameter]) -> None:
    """Make ``weights`` (same shape, dtype, device) views of one contiguous ``[n, out, in]`` tensor,
    keeping each ``Parameter`` object (optimizer entries, hooks and names are unchanged)."""
    if len(weights) == 0 or _adjacent(list(weights)):
        return
    packed = torch.stack([w.detach() for w in weights])
    for e, w in enumerate(weights):
        w.data = packed[e]


def _aligned(x: torch.Tensor, *widths: int) -> bool:
    return all((w * x.element_size()) % 16 == 0 for w in widths)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x [N, in]`` rows grouped by ``counts`` times ``weights [n, out, in]``^T -> ``[N, out]``."""
    n, out_features, in_features = weights.shape
    # torch.compile: the op's fake (meta) kernel accepts bf16 only, so compiled graphs use the loop.
    compiling_non_bf16 = torch.compiler.is_compiling() and x.dtype != torch.bfloat16
    if _GROUPED_MM is not None and not compiling_non_bf16 and x.dtype == weights.dtype \
            and _aligned(x, in_features, out_features):
        offs = torch.tensor(counts, dtype=torch.int32, device=x.device).cumsum(0, dtype=torch.int32)
        y = _GROUPED_MM(x.contiguous(), weights.transpose(1, 2), offs=offs)
        return _ContiguousGrad.apply(y)
    parts = [chunk @ weights[e].t() for e, chunk in enumerate(x.split(counts))]
    return torch.cat(parts, dim=0)


class GroupedMLP(SequentialMLP):
    """``SequentialMLP``'s experts (same parameters, names, init and checkpoint entries), run as two
    grouped GEMMs over all local experts instead of a Python loop. The combine weights scale fc2's
    input (Megatron-Core's order) or, when ``ffn/tp`` is wider than ``h``, fc2's output (Hugging
    Face's order; fewer elements, same maths without biases).

    Args:
        num_local_experts: experts held by this rank.
        config: the TransformerConfig (``moe_ffn_hidden_size``; no ``add_bias_linear``).
        submodules: the experts' linears; defaults to the local column/row-parallel linears.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig,
                 submodules: MLPSubmodules | None = None) -> None:
        if config.add_bias_linear:
            raise ValueError("GroupedMLP: add_bias_linear=True; grouped experts have no biases. Fix: set "
                             "add_bias_linear=False or use SequentialMLP (moe_grouped_gemm=False)")
        if submodules is None:
            submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        super().__init__(num_local_experts, config, submodules)
        self.gated = bool(config.gated_linear_unit)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.group_world_size(self.tp_group)
        self._pack()

    def _pack(self) -> None:
        pack_weights([e.linear_fc1.weight for e in self.local_experts])
        pack_weights([e.linear_fc2.weight for e in self.local_experts])

    def _apply(self, fn: Any, recurse: bool = True) -> GroupedMLP:
        # .to() / .cuda() / .float() give every parameter new storage: pack again.
        super()._apply(fn, recurse)
        self._pack()
        return self

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = torch.chunk(x, 2, dim=-1)
            return self.config.activation(gate) * up
        return self.config.activation(x)

    def forward(
        self, permuted_tokens: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, h]`` grouped by local expert -> ``[N, h]`` weighted expert outputs (partial over TP)."""
        counts = [int(c) for c in tokens_per_expert.tolist()]
        # [n_local, fc1/tp, h] and [n_local, h, ffn/tp]: views of the packed weights (no copy)
        weight1 = stack_weights([e.linear_fc1.weight for e in self.local_experts])
        weight2 = stack_weights([e.linear_fc2.weight for e in self.local_experts])
        x = copy_to_tensor_model_parallel_region(permuted_tokens, self.tp_group) if self.tp_size > 1 \
            else permuted_tokens
        intermediate = self._activate(grouped_matmul(x, weight1, counts))  # [N, ffn/tp]
        # No biases, so weighting fc2's input or its output is the same maths: do it on the narrower one.
        # Either way the weights meet a TP-partial quantity: their gradient is all-reduced over TP.
        probs = weights_for_tp_split(permuted_probs, self.tp_group).unsqueeze(-1)
        weight_output = intermediate.shape[-1] > weight2.shape[1]
        if not weight_output:
            intermediate = intermediate * probs.to(intermediate.dtype)
        out = grouped_matmul(intermediate, weight2, counts)  # [N, h], partial sums over TP (the layer reduces)
        if weight_output:
            out = out * probs.to(out.dtype)
        return out, None
