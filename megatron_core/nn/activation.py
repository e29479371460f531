"""The feed-forward activation of the drop-in transformer layers, as torch.nn has it.

``torch.nn.TransformerEncoderLayer`` computes ``linear2(dropout(activation(linear1(x))))``: its
activation may be a name or any callable, and a dropout sits between the activation and
``linear2``. ``ActivationDropout`` fills the MLP's ``activation_func`` spec slot with exactly that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_core.activations import ACTIVATIONS, GATED_ACTIVATIONS, gelu_tanh, name_of_activation
from megatron_core.config import TransformerConfig
from megatron_core.module import MegatronModule
from megatron_core.nn._base import tp_size
from megatron_core.tensor_parallel.random import get_rng_tracker

Activation = str | Callable[[torch.Tensor], torch.Tensor]


def resolve_activation(activation: Activation) -> tuple[Callable[[torch.Tensor], torch.Tensor], str | None]:
    """``(function, registered name or None)`` for what torch.nn layers accept as ``activation``.

    Names are the toolkit's registry (``"relu"``, ``"gelu"``, ...; torch itself takes the first two);
    callables may be functions (``F.gelu``) or modules (``nn.ReLU()``, ``nn.GELU(approximate="tanh")``).

    Raises:
        ValueError: an unknown name, or a gated name (the drop-in MLP is not gated).
        TypeError: neither a name nor a callable.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            gated = " (gated activations need a gated MLP: use a toolkit spec instead)" \
                if activation in GATED_ACTIVATIONS else ""
            raise ValueError(f"activation={activation!r} is not known{gated}; use one of {sorted(ACTIVATIONS)} "
                             "or pass a callable")
        return ACTIVATIONS[activation], activation
    if isinstance(activation, torch.nn.ReLU):
        return F.relu, "relu"
    if isinstance(activation, torch.nn.GELU):
        return (gelu_tanh, "gelu_tanh") if activation.approximate == "tanh" else (F.gelu, "gelu")
    if callable(activation):
        return activation, name_of_activation(activation)
    raise TypeError(f"activation must be a name or a callable; got {type(activation).__name__}")


class ActivationDropout(MegatronModule):
    """``dropout(activation(x))`` on the (TP-split) feed-forward hidden ``[s, b, ffn/tp]``.

    Args:
        config: the layer's TransformerConfig.
        activation: the elementwise function.
        dropout: probability, applied in training only.
    """

    def __init__(self, config: TransformerConfig, activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
                 dropout: float = 0.0) -> None:
        super().__init__(config)
        self.activation = activation
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(x)
        if not self.training or self.dropout == 0.0:
            return y
        # Each TP rank holds different ffn channels: draw its mask from the model-parallel stream.
        stream = get_rng_tracker().fork() if tp_size() > 1 else contextlib.nullcontext()
        with stream:
            return F.dropout(y, self.dropout, training=True)

    def extra_repr(self) -> str:
        return f"activation={getattr(self.activation, '__name__', self.activation)}, dropout={self.dropout}"
