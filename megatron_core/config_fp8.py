"""Validation of the FP8 fields of ``TransformerConfig`` (Megatron-Core's names and defaults).

Kept apart from ``config.py`` like the MoE checks. Only config-level mistakes are caught here;
whether the model can run FP8 (TE spec, TE installed, CUDA tensors, GPU support of the recipe) is
checked where the model and the machine are known: ``megatron_core.extensions.te_fp8``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_core.config import TransformerConfig

# Settings of TE's DelayedScaling recipe only, with their defaults: the other recipes compute scales
# from the current tensor (or its blocks) and have no margin or amax history.
DELAYED_ONLY_FIELDS: tuple[tuple[str, Any], ...] = (
    ("fp8_margin", 0),
    ("fp8_amax_history_len", 1),
    ("fp8_amax_compute_algo", "most_recent"),
)


def _fail(field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {why}. Fix: {fix}")


def validate_fp8(config: TransformerConfig) -> None:
    """Check the ``fp8*`` fields of ``config``; raises ``ValueError`` naming the field and the fix."""
    if config.fp8_amax_history_len < 1:
        raise _fail("fp8_amax_history_len", config.fp8_amax_history_len,
                    "the amax history holds at least the current step", "set fp8_amax_history_len >= 1 "
                    "(Megatron-Core's default 1; TE's DelayedScaling default 1024)")
    if config.fp8_margin < 0:
        raise _fail("fp8_margin", config.fp8_margin,
                    "a negative margin scales tensors past the FP8 range (scale = 2^-margin x fp8 max / amax)",
                    "set fp8_margin >= 0 (default 0)")
    if config.fp8 is None:
        return
    if config.fp8_recipe != "delayed":
        for name, default in DELAYED_ONLY_FIELDS:
            value = getattr(config, name)
            if value != default:
                raise _fail(name, value, f"is a setting of fp8_recipe='delayed' only; fp8_recipe="
                            f"{config.fp8_recipe!r} computes its scales from the current tensors",
                            f"leave {name} at {default!r}, or use fp8_recipe='delayed'")
