"""Errors and the state-dict type shared by the Hugging Face converters."""

from __future__ import annotations

from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


class HFInteropError(ValueError):
    """A Hugging Face model, config or state dict cannot be converted as asked."""


class UnsupportedHFConfigError(HFInteropError):
    """A Hugging Face config uses a feature our models cannot represent exactly."""

    def __init__(self, model_type: str, field_name: str, value: Any, why: str, fix: str) -> None:
        super().__init__(f"{model_type}: {field_name}={value!r} is not supported: {why}. Fix: {fix}")
        self.model_type = model_type
        self.field_name = field_name
        self.value = value
