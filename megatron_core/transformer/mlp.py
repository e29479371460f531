"""The transformer MLP: fc1 (column-parallel) -> activation -> fc2 (row-parallel).

Gated variants (swiglu, geglu, reglu: ``config.gated_linear_unit``) keep both halves in fc1, whose
full weight is ``[gate; up]`` of shape ``[2 * ffn, h]`` (Megatron-Core's layout). fc1 is built with
``stride=2`` so that the TP-invariant initialisation gives TP rank ``r`` the rows
``[gate_r; up_r]``: each rank then computes ``act(gate_r) * up_r`` on its own.

In a checkpoint the gated fc1 stays ONE global tensor ``[gate_full; up_full]`` (a TP=1 checkpoint
is a plain fc1 weight); each rank's two halves are stored as two fragments of a ``2 * tp`` grid
(``apply_swiglu_sharded_factory``), which is what makes resharding between TP sizes correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import (
    RankOffset,
    ReplicaId,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron_core.module import MegatronModule
from megatron_core.transformer.spec_utils import ModuleSpec, build_module


# ----------------------------------------------------------------------------- builder Protocols
class LinearFc1Interface(Protocol):
    """What the MLP needs from a built fc1: ``forward(x) -> (output, bias)``."""

    def forward(self, hidden_states: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class LinearFc1Builder(Protocol):
    """Constructor call the MLP makes for its ``linear_fc1`` slot."""

    def __call__(
        self,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], torch.Tensor],
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None,
        tp_group: ProcessGroup | None,
        stride: int = 1,
    ) -> LinearFc1Interface: ...


class TEActivationFunctionInterface(Protocol):
    """A fused activation module: takes fc1's output (both halves when gated)."""

    def forward(self, input_: torch.Tensor, /) -> torch.Tensor: ...


class TEActivationFunctionBuilder(Protocol):
    """Constructor call the MLP makes for its ``activation_func`` slot."""

    def __call__(self, *, config: TransformerConfig) -> TEActivationFunctionInterface: ...


class LinearFc2Interface(Protocol):
    """What the MLP needs from a built fc2: ``forward(x) -> (output, bias)``."""

    def forward(self, hidden_states: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class LinearFc2Builder(Protocol):
    """Constructor call the MLP makes for its ``linear_fc2`` slot."""

    def __call__(
        self,
        input_size: int,
        output_size: int,
        /,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], torch.Tensor],
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None,
        tp_group: ProcessGroup | None,
    ) -> LinearFc2Interface: ...


@dataclass
class MLPSubmodules:
    """Specs of the MLP's slots; ``activation_func=None`` uses ``config.activation_func``."""

    linear_fc1: ModuleSpec | type | LinearFc1Builder
    linear_fc2: ModuleSpec | type | LinearFc2Builder
    activation_func: ModuleSpec | type | TEActivationFunctionBuilder | None = None


# ----------------------------------------------------------------------------- module
class MLP(MegatronModule):
    """Position-wise feed-forward: ``fc2(act(fc1(x)))``, split over TP along the ffn dimension.

    Args:
        config: the TransformerConfig.
        submodules: specs of fc1, fc2 and (optionally) a fused activation module.
        is_expert: an MoE expert (its linears are not split the usual way).
        input_size: input width; defaults to ``config.hidden_size``.
        ffn_hidden_size: inner width; defaults to ``config.ffn_hidden_size``.
        tp_group: tensor-parallel group; defaults to parallel_state's.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        is_expert: bool = False,
        input_size: int | None = None,
        ffn_hidden_size: int | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, groups={"tp_group": tp_group})
        self.input_size = input_size if input_size is not None else config.hidden_size
        self.ffn_hidden_size = ffn_hidden_size if ffn_hidden_size is not None else config.ffn_hidden_size
        self.gated = bool(config.gated_linear_unit)
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        fc1_size = 2 * self.ffn_hidden_size if self.gated else self.ffn_hidden_size
        # cast: slot annotations name builder Protocols for check_spec; build_module takes any spec.
        self.linear_fc1 = build_module(
            submodules.linear_fc1, self.input_size, fc1_size,
            config=config, init_method=config.init_method, gather_output=False, bias=config.add_bias_linear,
            # The bias goes in fc1's matmul (no fused bias-activation kernel would take it; a separate
            # add is one more pass over [s, b, ffn]). A custom fc1 may still hand it back: added below.
            skip_bias_add=False, is_expert=is_expert, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
            # [gate; up]: stride 2 hands each rank a slice of both halves.
            stride=2 if self.gated else 1,
        )
        self.activation_module: torch.nn.Module | None = None
        self.activation_func: Callable[[torch.Tensor], torch.Tensor] = config.activation
        if submodules.activation_func is not None:
            self.activation_module = build_module(submodules.activation_func, config=config)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, self.ffn_hidden_size, config.hidden_size,
            config=config, init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=is_expert, tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )

    def _activate(self, intermediate: torch.Tensor) -> torch.Tensor:
        if self.activation_module is not None:
            return self.activation_module(intermediate)
        if self.gated:
            gate, up = torch.chunk(intermediate, 2, dim=-1)  # [s, b, 2*f/tp] -> 2 x [s, b, f/tp]
            return self.activation_func(gate) * up
        return self.activation_func(intermediate)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, h]`` -> ``(output [s, b, h], output_bias or None)`` (bias left for bias-dropout-add)."""
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, fc1_size/tp]
        if bias is not None:
            intermediate = intermediate + bias
        intermediate = self._activate(intermediate)  # [s, b, ffn/tp]
        return self.linear_fc2(intermediate)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        """Children's sharding, with the gated fc1 weight/bias replaced by the swiglu factory."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.gated:
            for name in ("weight", "bias"):
                key = f"{prefix}linear_fc1.{name}"
                if isinstance(out.get(key), ShardedTensor):
                    out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        return out


# ----------------------------------------------------------------------------- checkpoint layout
def apply_swiglu_sharded_factory(
    original_sh_ten: ShardedTensor, sharded_offsets: tuple[RankOffset, ...] = ()
) -> ShardedTensorFactory:
    """Store a rank's ``[gate_r; up_r]`` as two fragments of the global ``[gate_full; up_full]``.

    Along the TP axis the global tensor is cut into ``2 * tp`` fragments: rank ``r`` writes its gate
    half at fragment ``r`` and its up half at fragment ``tp + r``. ``build()`` gives those two
    ``ShardedTensor``s (same key); ``merge_fn`` concatenates the two loaded halves back.

    Args:
        original_sh_ten: fc1's weight or bias as a TP-split ``ShardedTensor`` (axis 0 local).
        sharded_offsets: the offsets prepended by enclosing modules (e.g. a layer-stacking axis).
    """
    prepend = len(sharded_offsets)
    axis = prepend  # fc1's output (row) axis in the global tensor
    local_rows = original_sh_ten.local_shape[0]
    if local_rows % 2 != 0:
        raise ValueError(
            f"{original_sh_ten.key}: a gated fc1 shard must have an even number of rows ([gate; up]); "
            f"got {local_rows}"
        )
    offset = original_sh_ten.global_offset[axis]
    if offset % local_rows != 0:
        raise ValueError(
            f"{original_sh_ten.key}: global offset {offset} on axis {axis} is not a multiple of the local "
            f"size {local_rows}; the gated fc1 must be split evenly over TP ranks"
        )
    rank = offset // local_rows
    fragments = (original_sh_ten.axis_fragmentations or (1,) * len(original_sh_ten.global_shape))[axis]

    def build_fn(key: str, data: torch.Tensor, replica_id: ReplicaId) -> list[ShardedTensor]:
        with torch.no_grad():
            gate, up = torch.chunk(data, 2, dim=0)  # [2*f/tp, ...] -> 2 x [f/tp, ...]
        return [
            ShardedTensor.from_rank_offsets(
                key, gate, *sharded_offsets, (axis, rank, 2 * fragments),
                replica_id=replica_id, prepend_axis_num=prepend,
            ),
            ShardedTensor.from_rank_offsets(
                key, up, *sharded_offsets, (axis, fragments + rank, 2 * fragments),
                replica_id=replica_id, prepend_axis_num=prepend,
            ),
        ]

    def merge_fn(loaded: Any) -> torch.Tensor:
        parts = list(loaded.values()) if isinstance(loaded, dict) else list(loaded)
        with torch.no_grad():
            return torch.cat(parts, dim=0)  # [gate_r; up_r]

    assert original_sh_ten.data is not None
    return ShardedTensorFactory(
        original_sh_ten.key, original_sh_ten.data, build_fn, merge_fn, original_sh_ten.replica_id
    )
