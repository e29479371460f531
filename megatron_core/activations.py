"""Activation functions by name: the one registry that keeps configs serialisable.

A config stores an activation as a string (``"gelu"``, ``"swiglu"``...); modules ask this
registry for the callable. Gated names (``swiglu``, ``geglu``, ``reglu``) imply
``gated_linear_unit=True`` with the matching elementwise function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, as in Primer and Megatron-Core."""
    return torch.pow(F.relu(x), 2)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the approximation used by CLIP."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "squared_relu": squared_relu,
    "quick_gelu": quick_gelu,
}

# A gated activation name is shorthand for (elementwise function, gated_linear_unit=True).
GATED_ACTIVATIONS: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def activation_by_name(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the elementwise activation registered under ``name``.

    Raises:
        KeyError: ``name`` is not registered; the message lists the known names.
    """
    name = GATED_ACTIVATIONS.get(name, name)
    if name not in ACTIVATIONS:
        raise KeyError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS) + sorted(GATED_ACTIVATIONS)}")
    return ACTIVATIONS[name]


def name_of_activation(fn: Callable[..., torch.Tensor]) -> str | None:
    """The registered name of ``fn``, or None when it is not in the registry."""
    for name, registered in ACTIVATIONS.items():
        if registered is fn:
            return name
    return None
