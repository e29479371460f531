"""FP8 training through Transformer Engine: TE's recipe object from the config, checks, and the autocast.

Written against TE 2.x's documented API (``transformer_engine.common.recipe``,
``transformer_engine.pytorch.fp8_autocast``, ``FP8GlobalStateManager``'s support checks) and
tested only against the CPU stand-in of that API in ``tests/extensions/fake_te``: not run on a
GPU nor with real Transformer Engine.

TE is imported inside the functions, never at module import, so the training loop can import
this module on machines without TE; every entry point fails with a message naming what is missing.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_usability import require_te

__all__ = ["FP8_DEVICE_TYPES", "build_fp8_recipe", "check_fp8_model", "check_fp8_support", "fp8_context"]

# Where TE's FP8 kernels run. A module constant so that the CPU stand-in's tests can add "cpu".
FP8_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

# fp8_recipe -> (TE recipe class, FP8GlobalStateManager's availability check)
_RECIPES: dict[str, tuple[str, str]] = {
    "delayed": ("DelayedScaling", "is_fp8_available"),
    "tensorwise": ("Float8CurrentScaling", "is_fp8_available"),
    "mxfp8": ("MXFP8BlockScaling", "is_mxfp8_available"),
    "blockwise": ("Float8BlockScaling", "is_fp8_block_scaling_available"),
}


def _need_fp8(config: TransformerConfig) -> None:
    if config.fp8 is None:
        raise ValueError("config.fp8 is None: there is no FP8 recipe to build. Fix: set fp8='hybrid' or 'e4m3'")
    require_te(f"FP8 training (fp8={config.fp8!r}, fp8_recipe={config.fp8_recipe!r})")


def _recipe_class(config: TransformerConfig) -> Any:
    recipes = importlib.import_module("transformer_engine.common.recipe")
    name = _RECIPES[config.fp8_recipe][0]
    cls = getattr(recipes, name, None)
    if cls is None:
        te = importlib.import_module("transformer_engine")
        raise RuntimeError(
            f"fp8_recipe={config.fp8_recipe!r} needs transformer_engine.common.recipe.{name}, which Transformer "
            f"Engine {getattr(te, '__version__', '?')} does not have. Fix: install a TE 2.x release that offers "
            "it, or use fp8_recipe='delayed'")
    return cls


def build_fp8_recipe(config: TransformerConfig) -> Any:
    """TE's recipe object for ``config.fp8_recipe`` with ``config.fp8``'s format.

    ``"hybrid"``: E4M3 forward, E5M2 gradients; ``"e4m3"``: E4M3 throughout. Only ``delayed``
    (``DelayedScaling``) takes the margin and the amax history settings.

    Raises:
        ValueError: ``config.fp8`` is None.
        TEUnavailableError: TE is not installed or there is no GPU.
        RuntimeError: the installed TE lacks the recipe class.
    """
    _need_fp8(config)
    cls = _recipe_class(config)
    recipes = importlib.import_module("transformer_engine.common.recipe")
    fmt = recipes.Format.HYBRID if config.fp8 == "hybrid" else recipes.Format.E4M3
    if config.fp8_recipe == "delayed":
        return cls(fp8_format=fmt, margin=config.fp8_margin, amax_history_len=config.fp8_amax_history_len,
                   amax_compute_algo=config.fp8_amax_compute_algo)
    return cls(fp8_format=fmt)


def check_fp8_support(config: TransformerConfig) -> None:
    """Ask TE whether this GPU runs ``config.fp8_recipe`` (TE's own ``FP8GlobalStateManager`` checks).

    Raises:
        RuntimeError: TE says no (its reason is quoted), or the installed TE lacks the check.
    """
    _need_fp8(config)
    _recipe_class(config)  # a missing recipe class is the clearer message
    manager = importlib.import_module("transformer_engine.pytorch.fp8").FP8GlobalStateManager
    check_name = _RECIPES[config.fp8_recipe][1]
    check = getattr(manager, check_name, None)
    if check is None:
        raise RuntimeError(f"fp8_recipe={config.fp8_recipe!r}: the installed Transformer Engine has no "
                           f"FP8GlobalStateManager.{check_name}() to confirm GPU support. Fix: upgrade TE to 2.x")
    available, reason = check()
    if not available:
        raise RuntimeError(f"fp8_recipe={config.fp8_recipe!r} is not supported on this GPU: Transformer Engine "
                           f"says {reason!r}. Fix: use a recipe this GPU supports (delayed/tensorwise need compute "
                           "capability >= 8.9, mxfp8 a Blackwell GPU), or unset fp8")


def check_fp8_model(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Fail early when ``model`` cannot train in FP8 (no-op when ``config.fp8`` is None).

    Raises:
        TEUnavailableError: TE is not installed or there is no GPU.
        ValueError: no layer of ``model`` is a TE module (the local spec has no FP8 path), or its TE
            modules' parameters are not on a CUDA device.
        RuntimeError: the GPU does not support the recipe (see :func:`check_fp8_support`).
    """
    if config.fp8 is None:
        return
    _need_fp8(config)
    te_common = importlib.import_module("megatron_core.extensions.te_common")
    te_modules = [m for m in model.modules() if isinstance(m, te_common.TEModuleMixin)]
    if not te_modules:
        raise ValueError(
            f"fp8={config.fp8!r} is set but {type(model).__name__} has no Transformer Engine layers: only TE's "
            "linears run in FP8 and the local spec's have no FP8 path. Fix: build the model from "
            "specs.gpt.get_gpt_layer_te_spec() (or specs.llama.get_llama_layer_te_spec()), or unset fp8")
    devices = sorted({p.device.type for m in te_modules for p in m.parameters()})
    wrong = [d for d in devices if d not in FP8_DEVICE_TYPES]
    if wrong:
        raise ValueError(
            f"fp8={config.fp8!r}: the model's Transformer Engine layers hold parameters on {wrong}, but TE's FP8 "
            f"kernels run on {list(FP8_DEVICE_TYPES)} only. Fix: move the model to a GPU (training.device: cuda "
            "or auto on a GPU machine), or unset fp8")
    check_fp8_support(config)


def amax_reduction_group() -> ProcessGroup | None:
    """Megatron-Core's default: the tensor x data x context parallel ranks of this pipeline stage."""
    return parallel_state.get_amax_reduction_group()


@contextlib.contextmanager
def fp8_context(config: TransformerConfig, group: ProcessGroup | None = None) -> Iterator[None]:
    """TE's ``fp8_autocast`` with the config's recipe; a no-op when ``config.fp8`` is None.

    Enter it around the forward pass only: TE runs the backward in FP8 by itself.

    Args:
        config: the model's config (``fp8``, ``fp8_recipe``, ...).
        group: where TE reduces the amax (and so agrees on the scales); default
            :func:`amax_reduction_group` (tensor x data x context parallel ranks, as Megatron-Core).
    """
    if config.fp8 is None:
        yield
        return
    recipe = build_fp8_recipe(config)
    te_pytorch = importlib.import_module("transformer_engine.pytorch")
    with te_pytorch.fp8_autocast(enabled=True, fp8_recipe=recipe,
                                 fp8_group=group if group is not None else amax_reduction_group()):
        yield
