"""Stand-in of ``transformer_engine.pytorch.fp8``: the FP8 autocast state and the GPU support checks.

``fp8_autocast`` only RECORDS (``ENTERED``: one entry per enter, with its recipe and group) and
marks the modules' forward passes as FP8 ones; nothing is quantised. ``SUPPORT`` sets what the
support checks answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class AutocastEntry:
    enabled: bool
    recipe: Any
    group: Any


ENTERED: list[AutocastEntry] = []
# check name -> (available, reason), as TE's FP8GlobalStateManager answers on a GPU
SUPPORT: dict[str, tuple[bool, str]] = {
    "is_fp8_available": (True, ""),
    "is_mxfp8_available": (True, ""),
    "is_fp8_block_scaling_available": (True, ""),
}


class FP8GlobalStateManager:
    _active: list[AutocastEntry] = []

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return bool(cls._active) and cls._active[-1].enabled

    @classmethod
    def get_fp8_recipe(cls) -> Any:
        return cls._active[-1].recipe if cls._active else None

    @staticmethod
    def is_fp8_available() -> tuple[bool, str]:
        return SUPPORT["is_fp8_available"]

    @staticmethod
    def is_mxfp8_available() -> tuple[bool, str]:
        return SUPPORT["is_mxfp8_available"]

    @staticmethod
    def is_fp8_block_scaling_available() -> tuple[bool, str]:
        return SUPPORT["is_fp8_block_scaling_available"]


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe: Any = None, fp8_group: Any = None,
                 **unused: Any) -> Iterator[None]:
    entry = AutocastEntry(enabled, fp8_recipe, fp8_group)
    ENTERED.append(entry)
    FP8GlobalStateManager._active.append(entry)
    try:
        yield
    finally:
        FP8GlobalStateManager._active.pop()
