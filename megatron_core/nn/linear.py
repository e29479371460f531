"""``ParallelLinear``: ``torch.nn.Linear`` that can split its weight across tensor-parallel ranks.

=========  ==========================================  =====================================
``dim``    class built (all are ``ParallelLinear``)    local weight / what forward does
=========  ==========================================  =====================================
None       plain linear                                ``[out, in]``: exactly ``nn.Linear``
1 or -1    column split, a ``ColumnParallelLinear``    ``[out/tp, in]``; output all-gathered
0          row split, a ``RowParallelLinear``          ``[out, in/tp]``; partial sums reduced
=========  ==========================================  =====================================

Inputs and outputs are ``nn.Linear``'s (``[*, in] -> [*, out]``, any leading dims), so swapping
the class keeps a model working. Gathering the column output by default is what makes that true;
pass ``gather_output=False`` to keep ``[*, out/tp]`` (tagged ``get_parallel_dim(y) == -1``) and feed
it to a row-split ``ParallelLinear`` (which takes split inputs as they are) or to
``ParallelCrossEntropyLoss`` (which reads the tag), Megatron-style, with no gather at all.

Initialisation equals ``nn.Linear``'s from the same seed (kaiming-uniform weight, fan-in uniform
bias), drawn full on the CPU in fp32 and sliced, so the full weight is the same at every TP size.
``load_state_dict`` takes full tensors (an ``nn.Linear`` state dict) as well as local shards.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megatron_core.module import MegatronModule
from megatron_core.nn._base import (
    TorchLoadMixin,
    linear_layer_config,
    normalize_dim,
    tp_size,
)
from megatron_core.nn.init import shard_init_helper_
from megatron_core.nn.parallel_dim import set_parallel_dim
from megatron_core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region
from megatron_core.tensor_parallel.utils import TensorParallelError

__all__ = ["ParallelLinear"]


def _kaiming_weight_init(tensor: torch.Tensor) -> None:
    torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # nn.Linear.reset_parameters


def _init_bias(bias: torch.Tensor | None, in_features: int, dim: int | None) -> None:
    if bias is None:
        return
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    shard_init_helper_(torch.nn.init.uniform_, bias, dim=dim, a=-bound, b=bound)


class ParallelLinear(TorchLoadMixin, MegatronModule):
    """Drop-in ``torch.nn.Linear`` with optional tensor-parallel splitting.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        dim: None (not split), 1 / -1 (split output features, column), 0 (split input features, row).
        device, dtype: as ``nn.Linear``; split layers hold float32/bfloat16/float16.
        gather_output: column split only: return the full ``[*, out]`` (default) or this rank's
            ``[*, out/tp]`` tagged with parallel dim -1.

    Example:
        >>> layer = ParallelLinear(20, 30, dim=1)   # at TP=2 each rank holds 15 output rows
        >>> layer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    in_features: int
    out_features: int
    dim: int | None

    def __new__(cls, *args: Any, **kwargs: Any) -> ParallelLinear:
        if cls is ParallelLinear:
            dim = kwargs["dim"] if "dim" in kwargs else (args[3] if len(args) > 3 else None)
            cls = _CLASSES[normalize_dim(dim, "ParallelLinear")]
        return super().__new__(cls)

    def _get_name(self) -> str:
        return "ParallelLinear"

    def extra_repr(self) -> str:
        split = "" if self.dim is None else f", tp={tp_size()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dim={self.dim}{split}")

    def _finish(self, in_features: int, out_features: int, dim: int | None, device: Any) -> None:
        self.in_features, self.out_features, self.dim = in_features, out_features, dim
        if device is not None:
            self.to(device)

    @classmethod
    def convert_parallel_linear(
        cls, module: torch.nn.Module, dim: int | None = None, gather_output: bool = True
    ) -> torch.nn.Module:
        """Replace every ``torch.nn.Linear`` in ``module`` by a ``ParallelLinear`` holding the same values.

        Every rank must hold the same ``module`` (same seed, or loaded from the same file): each
        keeps its slice of the existing weights. No random numbers are drawn. The projections
        inside a ``torch.nn.MultiheadAttention`` are left alone (torch uses their weights directly);
        switch to ``megatron_core.nn.MultiheadAttention`` to split attention.

        Args:
            module: a model, or a bare ``nn.Linear``.
            dim: the split of every converted layer (None, 0, 1 / -1).
            gather_output: for column splits, see ``ParallelLinear``.

        Returns:
            ``module`` itself with its linears replaced in place, or a new ``ParallelLinear`` when
            ``module`` is itself an ``nn.Linear``.
        """
        if isinstance(module, torch.nn.Linear):
            return _from_linear(module, dim, gather_output)
        if isinstance(module, torch.nn.MultiheadAttention):
            # torch's attention reads out_proj.weight directly instead of calling the layer, so a
            # split out_proj would silently compute the wrong thing; use megatron_core.nn.MultiheadAttention.
            return module
        for name, child in module.named_children():
            converted = cls.convert_parallel_linear(child, dim, gather_output)
            if converted is not child:
                setattr(module, name, converted)
        return module


def _from_linear(linear: torch.nn.Linear, dim: int | None, gather_output: bool) -> ParallelLinear:
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not shift the caller's RNG
        new = ParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, dim=dim,
                             dtype=linear.weight.dtype, gather_output=gather_output)
    new.load_state_dict(linear.state_dict())
    new.to(linear.weight.device)
    for name, param in new.named_parameters():
        param.requires_grad_(getattr(linear, name).requires_grad)
    new.train(linear.training)
    return new


# ----------------------------------------------------------------------------- the three layouts
class _Linear(ParallelLinear):
    """``dim=None``: ``nn.Linear`` exactly (same parameters, init, forward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dim: int | None = None,
                 device: Any = None, dtype: torch.dtype | None = None, gather_output: bool = True) -> None:
        MegatronModule.__init__(self, None)
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.gather_output = gather_output
        _kaiming_weight_init(self.weight)
        _init_bias(self.bias, in_features, None)
        self._finish(in_features, out_features, None, None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class _ColumnLinear(ParallelLinear, ColumnParallelLinear):
    """``dim=1``: output features split; ``[*, in] -> [*, out]`` (or ``[*, out/tp]`` ungathered)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dim: int | None = 1,
                 device: Any = None, dtype: torch.dtype | None = None, gather_output: bool = True) -> None:
        ColumnParallelLinear.__init__(
            self, in_features, out_features, config=linear_layer_config(dtype), init_method=_kaiming_weight_init,
            bias=bias, gather_output=gather_output,
        )
        _init_bias(self.bias, in_features, 0)
        self._finish(in_features, out_features, dim, device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, _ = ColumnParallelLinear.forward(self, input)  # [*, out] or [*, out/tp]
        return out if self.gather_output else set_parallel_dim(out, -1)


class _RowLinear(ParallelLinear, RowParallelLinear):
    """``dim=0``: input features split; takes ``[*, in]`` (scattered here) or ``[*, in/tp]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dim: int | None = 0,
                 device: Any = None, dtype: torch.dtype | None = None, gather_output: bool = True) -> None:
        RowParallelLinear.__init__(
            self, in_features, out_features, config=linear_layer_config(dtype), init_method=_kaiming_weight_init,
            bias=bias, input_is_parallel=True, skip_bias_add=False,
        )
        self.gather_output = gather_output  # unused: a row split always returns the full output
        _init_bias(self.bias, in_features, None)
        self._finish(in_features, out_features, dim, device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        features = input.shape[-1]
        if features == self.in_features and self.tp_size > 1:
            input = scatter_to_tensor_model_parallel_region(input, self.tp_group)  # [*, in] -> [*, in/tp]
        elif features != self.input_size_per_partition:
            raise TensorParallelError(
                f"ParallelLinear(dim=0): input has {features} features; expected the full {self.in_features} "
                f"or this rank's {self.input_size_per_partition} (in_features / tp)"
            )
        out, _ = RowParallelLinear.forward(self, input)  # [*, out]
        return out


_CLASSES: dict[int | None, type[ParallelLinear]] = {None: _Linear, 1: _ColumnLinear, 0: _RowLinear}
