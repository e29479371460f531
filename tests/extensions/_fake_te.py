"""Put the CPU reference of TE's API (``tests/extensions/fake_te``) in place of Transformer Engine.

Used by the wrapper tests to run ``megatron_core.extensions.transformer_engine`` on CPU: the
reference is importable as ``transformer_engine.pytorch`` and the usability check is told that a
GPU is present. Everything is undone on exit, so other tests see the real (absent) TE.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from megatron_core.extensions import te_usability

FAKE_TE_ROOT = str(Path(__file__).parent / "fake_te")
_OUR_TE_MODULES = (
    "megatron_core.extensions.transformer_engine",
    "megatron_core.extensions.te_common",
    "megatron_core.extensions.te_attention",
)


def _forget_te_modules() -> None:
    for name in list(sys.modules):
        if name == "transformer_engine" or name.startswith("transformer_engine.") or name in _OUR_TE_MODULES:
            del sys.modules[name]
    package = sys.modules.get("megatron_core.extensions")
    for name in _OUR_TE_MODULES:
        attr = name.rsplit(".", 1)[1]
        if package is not None and hasattr(package, attr):
            delattr(package, attr)
    te_usability.te_import_error.cache_clear()


def enable_fake_te() -> ModuleType:
    """Install the reference for the rest of this process (for ``run_distributed`` workers)."""
    _forget_te_modules()
    if FAKE_TE_ROOT not in sys.path:
        sys.path.insert(0, FAKE_TE_ROOT)
    te_usability.cuda_device_count = lambda: 1  # type: ignore[assignment]
    import megatron_core.extensions.transformer_engine as wrappers

    return wrappers


@contextlib.contextmanager
def fake_te() -> Iterator[ModuleType]:
    """Context manager: the TE wrappers module, backed by the CPU reference; restored on exit."""
    saved_count = te_usability.cuda_device_count
    try:
        yield enable_fake_te()
    finally:
        te_usability.cuda_device_count = saved_count  # type: ignore[assignment]
        if FAKE_TE_ROOT in sys.path:
            sys.path.remove(FAKE_TE_ROOT)
        _forget_te_modules()
