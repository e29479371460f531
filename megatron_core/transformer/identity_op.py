"""Placeholders that let a spec leave a slot empty (e.g. no q/k layernorm, no cross-attention)."""

from __future__ import annotations

from typing import Any

import torch


class IdentityOp(torch.nn.Module):
    """Returns its first input unchanged, whatever it was built with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class IdentityFuncOp(IdentityOp):
    """Like ``IdentityOp``, but calling it returns the identity function (for bias-dropout-add slots)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return lambda x, *a, **k: x
