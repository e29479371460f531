"""CPU reference of ``transformer_engine.pytorch.ops`` activations (TE's maths: GELU is the tanh
approximation; gated ops apply the gate to the FIRST half of the last dimension)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _srelu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) ** 2


def _qgelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class _Activation(torch.nn.Module):
    fn: Callable[[torch.Tensor], torch.Tensor] = staticmethod(F.relu)
    gated = False

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: object) -> None:
        if state is not None and not (isinstance(state, torch.Tensor) and state.numel() == 0):
            raise RuntimeError("the CPU reference holds no FP8 state")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = torch.chunk(x, 2, dim=-1)
            return type(self).fn(gate) * up
        return type(self).fn(x)


def _op(name: str, fn: Callable[[torch.Tensor], torch.Tensor], gated: bool) -> type:
    return type(name, (_Activation,), {"fn": staticmethod(fn), "gated": gated})


GELU = _op("GELU", _gelu_tanh, False)
GEGLU = _op("GEGLU", _gelu_tanh, True)
ReLU = _op("ReLU", F.relu, False)
ReGLU = _op("ReGLU", F.relu, True)
SiLU = _op("SiLU", F.silu, False)
SwiGLU = _op("SwiGLU", F.silu, True)
SReLU = _op("SReLU", _srelu, False)
SReGLU = _op("SReGLU", _srelu, True)
QGELU = _op("QGELU", _qgelu, False)
QGEGLU = _op("QGEGLU", _qgelu, True)
