"""NVIDIA Transformer Engine (TE) kernels behind the same slots, calls and checkpoints as the local layers.

Importable only where TE is usable (``transformer_engine.pytorch`` imports and a CUDA GPU is
present); elsewhere importing this module raises ``TEUnavailableError`` (an ``ImportError``) that
says what is missing and names the local spec. Specs refer to these classes by dotted path
(``specs/backends.py``), so nothing imports this module on a CPU machine unless asked to.

Each wrapper takes the constructor call of the slot it fills (``LinearFc1Builder``,
``LinearFc2Builder``, the attention core's and the norm's calls, ``TEActivationFunctionBuilder``)
and returns what the local module returns, so a spec swaps one for the other with nothing else
changed:

* ``TEColumnParallelLinear`` / ``TERowParallelLinear`` / ``TELinear``: ``forward(x) -> (out, bias)``;
* ``TELayerNormColumnParallelLinear``: the pre-norm (LayerNorm or RMSNorm, by
  ``config.normalization``) fused into the column-parallel linear that follows it;
* ``TEDotProductAttention``: q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]`` -> ``[sq, b, np*hn]``
  with the local core's mask semantics;
* ``TENorm``: TE's LayerNorm/RMSNorm; ``TEActivationOp``: a fused TE activation.

Initialisation is the local layers' TP-invariant one (the full weight is drawn from the default
CPU RNG, each rank keeps its slice), so a seed gives the local and the TE spec the same weights.

Checkpoints: ``sharded_state_dict`` uses the local twin's keys, split axes and layouts. A fused
norm's ``layer_norm_weight``/``layer_norm_bias`` are stored under the local norm's key
(``...input_layernorm.weight`` for ``self_attention.linear_qkv``, ``...pre_mlp_layernorm.weight``
for ``mlp.linear_fc1``); the dict key stays the module's ``state_dict`` name so a loaded dict goes
straight into ``load_state_dict``. TE's ``_extra_state`` (FP8 scaling metadata) is deliberately
not checkpointed, and loading accepts a state dict without it: TE and local checkpoints are
interchangeable under strict loading (see ``te_key_map`` for plain ``state_dict()`` names).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict
from megatron_core.extensions.te_common import (
    TEModuleMixin,
    resolve_tp,
    te,
    tp_invariant_init,
)
from megatron_core.extensions.te_key_map import local_norm_prefix
from megatron_core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TEActivationOp",
    "TEColumnParallelLinear",
    "TEDotProductAttention",
    "TELayerNormColumnParallelLinear",
    "TELinear",
    "TENorm",
    "TERowParallelLinear",
]


def _check_layer_options(is_expert: bool, owner: str) -> None:
    if is_expert:
        raise NotImplementedError(
            f"{owner}: is_expert=True (mixture-of-experts) is not supported by the TE wrappers; build dense MLPs"
        )


_LINEAR_MODES: dict[str | None, tuple[int, dict[str, int]]] = {
    # parallel mode -> (axis the weight is split along, checkpoint TP axes)
    "column": (0, {"weight": 0, "bias": 0}),
    "row": (1, {"weight": 1}),
    None: (0, {}),
}


def _te_linear_kwargs(
    input_size: int, output_size: int, *, parallel_mode: str | None, config: TransformerConfig,
    init_method: Callable[[torch.Tensor], Any], bias: bool, skip_bias_add: bool, tp_group: ProcessGroup | None, stride: int,
) -> dict[str, Any]:
    """Keyword arguments shared by ``te.pytorch.Linear`` and ``te.pytorch.LayerNormLinear``."""
    parallel_state.check_config_parallel_sizes(config, {"tp_group": tp_group})
    group, tp_size, tp_rank = resolve_tp(tp_group)
    if parallel_mode is None:
        tp_size_for_split, tp_rank_for_split = 1, 0
    else:
        tp_size_for_split, tp_rank_for_split = tp_size, tp_rank
    split_axis = _LINEAR_MODES[parallel_mode][0]
    return dict(
        in_features=input_size,
        out_features=output_size,
        sequence_parallel=bool(config.sequence_parallel) and tp_size > 1,
        tp_group=group if tp_size > 1 else None,
        tp_size=tp_size,
        init_method=tp_invariant_init(config, init_method, (output_size, input_size), split_axis, stride,
                                       tp_rank_for_split, tp_size_for_split),
        bias=bias,
        return_bias=bool(skip_bias_add and bias),
        params_dtype=config.torch_dtype,
        parallel_mode=parallel_mode,
    )


# ----------------------------------------------------------------------------- linears
class TELinear(TEModuleMixin, te.pytorch.Linear):
    """TE ``Linear`` returning ``(output, bias)``; ``parallel_mode`` "column", "row" or None (replicated).

    Args:
        input_size, output_size: full (unsplit) feature sizes.
        parallel_mode: how the weight is split over TP (None: every rank holds it whole).
        config: the TransformerConfig.
        init_method: initialiser of the full weight.
        bias: learn a bias.
        skip_bias_add: return the bias instead of adding it (for a fused bias-dropout-add).
        is_expert: an MoE expert's linear: its parameters are tagged ``allreduce = False``
            (Megatron-Core's marker: reduced over the expert-data-parallel group, not the data-parallel one).
        tp_comm_buffer_name: Megatron-Core's name of the layer's communication buffer; accepted so
            builders can pass it, ignored (no userbuffers comm overlap).
        tp_group: tensor-parallel group; defaults to parallel_state's.
        stride: interleaving of the split (2 for a gated ``[gate; up]`` fc1).
    """

    def __init__(
        self, input_size: int, output_size: int, /, *, parallel_mode: str | None, config: TransformerConfig,
        init_method: Callable[[torch.Tensor], Any], bias: bool, skip_bias_add: bool, is_expert: bool = False,
        tp_comm_buffer_name: str | None = None, tp_group: ProcessGroup | None = None, stride: int = 1,
    ) -> None:
        if parallel_mode not in _LINEAR_MODES:
            raise ValueError(f"{type(self).__name__}: parallel_mode={parallel_mode!r}; use 'column', 'row' or None")
        super().__init__(**_te_linear_kwargs(
            input_size, output_size, parallel_mode=parallel_mode, config=config, init_method=init_method,
            bias=bias, skip_bias_add=skip_bias_add, tp_group=tp_group, stride=stride,
        ))
        self.config = config
        self.te_return_bias = bool(skip_bias_add and bias)
        del tp_comm_buffer_name  # Megatron-Core-compatible argument; no userbuffers comm overlap here
        self._tp_axis_map = _LINEAR_MODES[parallel_mode][1]
        for param in (self.weight, getattr(self, "bias", None)):
            if isinstance(param, torch.nn.Parameter):
                param.allreduce = not is_expert  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        """``[s, b, in(/tp)]`` -> ``(output [s, b, out(/tp)], bias or None)``."""
        out = super().forward(x)
        if self.te_return_bias:
            return out  # TE returns (output, bias) when return_bias=True
        return out, None


class TEColumnParallelLinear(TELinear):
    """Column-parallel TE linear with ``ColumnParallelLinear``'s call (the ``LinearFc1Builder`` one).

    ``gather_output=True`` all-gathers the ``[s, b, out/tp]`` output to ``[s, b, out]`` like the
    local layer.
    """

    def __init__(
        self, input_size: int, output_size: int, /, *, config: TransformerConfig, init_method: Callable[[torch.Tensor], Any],
        gather_output: bool, bias: bool, skip_bias_add: bool, is_expert: bool = False,
        tp_comm_buffer_name: str | None = None, tp_group: ProcessGroup | None = None, stride: int = 1,
    ) -> None:
        super().__init__(
            input_size, output_size, parallel_mode="column", config=config, init_method=init_method, bias=bias,
            skip_bias_add=skip_bias_add, is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=tp_group, stride=stride,
        )
        _gather_output_check(self, gather_output, config)
        self.gather_output = gather_output
        self.tp_group_for_gather = resolve_tp(tp_group)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, in]`` -> ``(output [s, b, out/tp] or gathered [s, b, out], bias or None)``."""
        out, bias = super().forward(x)
        if self.gather_output and self.tp_size > 1:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group_for_gather)  # [s, b, out]
        return out, bias


class TERowParallelLinear(TELinear):
    """Row-parallel TE linear with ``RowParallelLinear``'s call (the ``LinearFc2Builder`` one).

    TE all-reduces the partial products (reduce-scatters them under sequence parallelism) and
    adds the bias after the reduction; ``input_is_parallel=False`` scatters a full input first.
    """

    def __init__(
        self, input_size: int, output_size: int, /, *, config: TransformerConfig, init_method: Callable[[torch.Tensor], Any],
        bias: bool, input_is_parallel: bool, skip_bias_add: bool, is_expert: bool = False,
        tp_comm_buffer_name: str | None = None, tp_group: ProcessGroup | None = None, stride: int = 1,
    ) -> None:
        if config.sequence_parallel and not input_is_parallel:
            raise ValueError(
                "TERowParallelLinear: sequence_parallel=True needs input_is_parallel=True (the input comes "
                "from a column-parallel layer); got input_is_parallel=False"
            )
        super().__init__(
            input_size, output_size, parallel_mode="row", config=config, init_method=init_method, bias=bias,
            skip_bias_add=skip_bias_add, is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=tp_group, stride=stride,
        )
        self.input_is_parallel = input_is_parallel
        self.tp_group_for_scatter = resolve_tp(tp_group)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, in/tp]`` (or ``[s, b, in]`` when not ``input_is_parallel``) -> ``(output [s, b, out], bias)``."""
        if not self.input_is_parallel and self.tp_size > 1:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group_for_scatter)  # [.., in] -> [.., in/tp]
        return super().forward(x)


def _gather_output_check(module: Any, gather_output: bool, config: TransformerConfig) -> None:
    if gather_output and config.sequence_parallel and module.tp_size > 1:
        raise ValueError(
            f"{type(module).__name__}: gather_output=True with sequence_parallel=True is not supported; keep the "
            "output split (gather_output=False) and gather where it is consumed"
        )


class TELayerNormColumnParallelLinear(TEModuleMixin, te.pytorch.LayerNormLinear):
    """A pre-norm fused into the column-parallel linear after it (``ColumnParallelLinear``'s call).

    The norm is ``config.normalization`` (LayerNorm or RMSNorm; a spec may pin it with the
    ``normalization`` param) with ``config.layernorm_epsilon`` and
    ``config.layernorm_zero_centered_gamma``. In a spec, the layer's own norm slot becomes
    ``IdentityOp``. Only valid for pre-norm layers whose residual is the un-normalised input.

    Checkpoint: weight/bias split along axis 0 like ``ColumnParallelLinear``; ``layer_norm_weight``
    / ``layer_norm_bias`` replicated and stored under the local norm's key when this module sits
    in a known slot (``te_key_map.FUSED_NORM_SLOTS``), else under its own name.
    """

    _tp_axis_map = {"weight": 0, "bias": 0}

    def __init__(
        self, input_size: int, output_size: int, /, *, config: TransformerConfig, init_method: Callable[[torch.Tensor], Any],
        gather_output: bool, bias: bool, skip_bias_add: bool, is_expert: bool = False,
        tp_comm_buffer_name: str | None = None, tp_group: ProcessGroup | None = None, stride: int = 1,
        normalization: str | None = None,
    ) -> None:
        name = type(self).__name__
        _check_layer_options(is_expert, name)
        if config.layernorm_position != "pre" or config.apply_residual_connection_post_layernorm:
            raise ValueError(
                f"{name} fuses the norm *before* its linear and keeps the raw input as the residual, but the config "
                f"has layernorm_position={config.layernorm_position!r}, apply_residual_connection_post_layernorm="
                f"{config.apply_residual_connection_post_layernorm}. Fix: use the local spec for post-norm layers"
            )
        super().__init__(
            eps=config.layernorm_epsilon, normalization=normalization or config.normalization,
            zero_centered_gamma=bool(config.layernorm_zero_centered_gamma),
            **_te_linear_kwargs(input_size, output_size, parallel_mode="column", config=config,
                                init_method=init_method, bias=bias, skip_bias_add=skip_bias_add,
                                tp_group=tp_group, stride=stride),
        )
        self.config = config
        self.te_return_bias = bool(skip_bias_add and bias)
        del tp_comm_buffer_name  # Megatron-Core-compatible argument; no userbuffers comm overlap here
        _gather_output_check(self, gather_output, config)
        self.gather_output = gather_output
        self.tp_group_for_gather = resolve_tp(tp_group)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        """``[s, b, in]`` -> ``(linear(norm(x)) [s, b, out/tp] (gathered: [s, b, out]), bias or None)``."""
        out = super().forward(x)
        out, bias = out if self.te_return_bias else (out, None)
        if self.gather_output and self.tp_size > 1:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group_for_gather)  # [s, b, out]
        return out, bias

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        """The linear's sharding, with the fused norm stored under the local norm's key."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        norm_prefix = local_norm_prefix(prefix)
        if norm_prefix is None:
            logger.debug("%s at %r has no local norm slot; its norm keeps TE's names", type(self).__name__, prefix)
            return out
        for te_name, local_name in (("layer_norm_weight", "weight"), ("layer_norm_bias", "bias")):
            entry = out.get(f"{prefix}{te_name}")
            if entry is not None:
                entry.key = f"{norm_prefix}{local_name}"
        return out


# ----------------------------------------------------------------------------- norms and activations
class TELayerNorm(TEModuleMixin, te.pytorch.LayerNorm):
    """TE LayerNorm (``weight``, ``bias``: the local ``LayerNorm``'s names), replicated over TP."""


class TERMSNorm(TEModuleMixin, te.pytorch.RMSNorm):
    """TE RMSNorm (``weight``: the local ``RMSNorm``'s name), replicated over TP."""


class TENorm:
    """Spec placeholder: builds TE's LayerNorm or RMSNorm as ``config.normalization`` says.

    Same call as the local norms: ``TENorm(config, hidden_size, eps)``; a spec may pin the kind
    with the ``normalization`` param.
    """

    def __new__(  # type: ignore[misc]
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, normalization: str | None = None
    ) -> torch.nn.Module:
        kind = normalization or config.normalization
        norm_cls = {"LayerNorm": TELayerNorm, "RMSNorm": TERMSNorm}.get(kind)
        if norm_cls is None:
            raise ValueError(f"TENorm: normalization={kind!r}; use 'LayerNorm' or 'RMSNorm'")
        norm: Any = norm_cls(
            hidden_size, eps=eps, sequence_parallel=bool(config.sequence_parallel),
            dtype=config.torch_dtype, zero_centered_gamma=bool(config.layernorm_zero_centered_gamma),
        )
        norm.config = config
        return norm


# (elementwise activation, gated) -> TE op class name. TE's gated ops gate the FIRST half, which
# is our fc1's [gate; up] layout. TE's GELU is the tanh approximation, so exact "gelu" has no twin.
_TE_ACTIVATIONS: dict[tuple[str, bool], str] = {
    ("gelu_tanh", False): "GELU", ("gelu_tanh", True): "GEGLU",
    ("relu", False): "ReLU", ("relu", True): "ReGLU",
    ("silu", False): "SiLU", ("silu", True): "SwiGLU",
    ("squared_relu", False): "SReLU", ("squared_relu", True): "SReGLU",
    ("quick_gelu", False): "QGELU", ("quick_gelu", True): "QGEGLU",
}
_GATED_BASE = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


class TEActivationOp(TEModuleMixin, torch.nn.Module):
    """A fused TE activation for the MLP's ``activation_func`` slot (``TEActivationFunctionBuilder``).

    Takes fc1's output (both halves ``[gate; up]`` when gated) and returns the activated
    ``[s, b, ffn/tp]``. Chosen from ``config.activation_func`` and ``config.gated_linear_unit``.
    """

    def __init__(self, *, config: TransformerConfig) -> None:
        super().__init__()
        base = _GATED_BASE.get(config.activation_func, config.activation_func)
        op_name = _TE_ACTIVATIONS.get((base, bool(config.gated_linear_unit)))
        if op_name is None:
            raise ValueError(
                f"TEActivationOp: no Transformer Engine op computes activation_func={config.activation_func!r} "
                f"(gated={config.gated_linear_unit}) exactly (TE's GELU is the tanh approximation). Fix: use "
                f"one of {sorted({a for a, _ in _TE_ACTIVATIONS})} (or swiglu/reglu), or leave the spec's "
                "activation_func slot empty to use the local activation"
            )
        self.config = config
        self.op = getattr(te.pytorch.ops, op_name)()

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """``[s, b, f(*2 when gated)/tp]`` -> ``[s, b, f/tp]``."""
        return self.op(input_)


# The attention core lives in its own file; importable from here for the dotted spec paths.
from megatron_core.extensions.te_attention import TEDotProductAttention  # noqa: E402
