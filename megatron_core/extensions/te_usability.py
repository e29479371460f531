"""Is NVIDIA Transformer Engine usable here? Checked without importing TE at module import time.

TE counts as usable only when ``import transformer_engine.pytorch`` succeeds **and** a CUDA device
is present: TE's kernels are CUDA-only, so an installed TE on a CPU machine is as good as none.
Everything that asks for TE (the TE layer specs, ``megatron_core.extensions.transformer_engine``)
goes through :func:`require_te`, whose message says what is missing and names the local spec,
which builds the same model (same checkpoint keys) with PyTorch kernels.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger(__name__)

TE_INSTALL_HINT = "pip install 'spec-megatron[te]'"
LOCAL_ALTERNATIVE = (
    "Build the same model without TE from the local spec: `get_gpt_layer_local_spec()` / "
    "`get_llama_layer_local_spec()`, or `get_gpt_layer_spec(backend='local')` "
    "(backend='auto' picks TE only when it is usable)"
)


class TEUnavailableError(ImportError):
    """Transformer Engine was asked for but cannot be used on this machine."""


@functools.lru_cache(maxsize=1)
def te_import_error() -> str | None:
    """Why ``import transformer_engine.pytorch`` fails (``None`` when it imports).

    Cached: a failed import of a CUDA extension is slow and its outcome does not change within a
    process.
    """
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # ImportError, but also OSError/RuntimeError from a broken CUDA build
        return f"{type(err).__name__}: {err}"
    return None


def cuda_device_count() -> int:
    """Visible CUDA devices (0 on a CPU-only torch build)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def te_missing_parts() -> list[str]:
    """What stands between this machine and TE, in words (empty when TE is usable)."""
    missing: list[str] = []
    if cuda_device_count() == 0:
        if torch.version.cuda is None:
            missing.append(f"a CUDA build of PyTorch (this torch {torch.__version__} has no CUDA support)")
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    error = te_import_error()
    if error is not None:
        missing.append(
            f"Transformer Engine (`import transformer_engine.pytorch` failed: {error}); install the "
            f"`te` extra: {TE_INSTALL_HINT}"
        )
    return missing


def is_te_usable() -> bool:
    """True when ``transformer_engine.pytorch`` imports and a CUDA device is present."""
    return not te_missing_parts()


def te_version() -> str | None:
    """The installed Transformer Engine version, or ``None`` when it does not import."""
    if te_import_error() is not None:
        return None
    te = importlib.import_module("transformer_engine")
    return str(getattr(te, "__version__", "unknown"))


def require_te(what: str = "the Transformer Engine spec") -> None:
    """Raise :class:`TEUnavailableError` unless TE is usable.

    Args:
        what: the thing that needs TE, named in the message (e.g. "get_gpt_layer_te_spec()").

    Raises:
        TEUnavailableError: names each missing part (the ``te`` extra, a CUDA build of torch, a
            GPU) and the local spec as the alternative.
    """
    missing = te_missing_parts()
    if not missing:
        return
    lines = "\n".join(f"  - {part}" for part in missing)
    raise TEUnavailableError(
        f"{what} needs NVIDIA Transformer Engine on a CUDA GPU, and this machine lacks:\n{lines}\n"
        f"Fix: on a machine with an NVIDIA GPU and CUDA, run `{TE_INSTALL_HINT}`. {LOCAL_ALTERNATIVE}."
    )
