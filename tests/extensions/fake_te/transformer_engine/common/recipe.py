"""Stand-in of ``transformer_engine.common.recipe``: TE 2.x's documented recipe classes and arguments.

Plain records (no scaling maths): the tests check which recipe our config builds and with what.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Format(enum.Enum):
    """TE's FP8 formats: E4M3 everywhere, E5M2 everywhere, or HYBRID (E4M3 forward, E5M2 backward)."""

    E4M3 = "E4M3"
    E5M2 = "E5M2"
    HYBRID = "HYBRID"


@dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Any = "max"
    scaling_factor_compute_algo: Any = None
    reduce_amax: bool = True


@dataclass
class Float8CurrentScaling:
    fp8_format: Format = Format.HYBRID


@dataclass
class MXFP8BlockScaling:
    fp8_format: Format = Format.E4M3


@dataclass
class Float8BlockScaling:
    fp8_format: Format = Format.E4M3
