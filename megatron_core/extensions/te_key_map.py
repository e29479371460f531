"""State-dict names of a Transformer Engine spec model <-> the local spec's: a pure, exact key map.

The pre-norm TE layer specs (GPT, Llama, T5) fuse each norm into the linear that follows it
(``TELayerNormColumnParallelLinear``), so in ``model.state_dict()`` the norm's parameters live
inside the linear under TE's names, and every TE module adds an ``_extra_state`` entry (TE's FP8
scaling metadata, an empty ``uint8`` tensor outside FP8 training). BERT's TE spec keeps separate
norms (post-norm layers cannot fuse them): pass ``fused_norms=False``, only ``_extra_state`` differs.

=====================================================  ================================================
local spec (``get_gpt_layer_local_spec``)               TE spec (``get_gpt_layer_te_spec``)
=====================================================  ================================================
``<layer>.input_layernorm.weight``                      ``<layer>.self_attention.linear_qkv.layer_norm_weight``
``<layer>.input_layernorm.bias`` (LayerNorm only)       ``<layer>.self_attention.linear_qkv.layer_norm_bias``
``<layer>.pre_mlp_layernorm.weight``                    ``<layer>.mlp.linear_fc1.layer_norm_weight``
``<layer>.pre_mlp_layernorm.bias`` (LayerNorm only)     ``<layer>.mlp.linear_fc1.layer_norm_bias``
``<layer>.pre_cross_attn_layernorm.{weight,bias}``      ``<layer>.cross_attention.linear_q.layer_norm_{weight,bias}``
(no entry)                                              ``<layer>.<TE module>._extra_state``
every other key                                         the same key, same tensor
=====================================================  ================================================

Every weight keeps its layout (the fused QKV rows stay per query group, the gated fc1 stays
``[gate; up]``), so values pass through untouched: ``te_to_local_state_dict(local_to_te_state_dict(sd))``
returns ``sd`` itself, tensor for tensor.

``_extra_state`` is dropped on the way to local names (the local modules have none), and on the way
back it is only added on request (``with_extra_state=True``): the TE wrappers accept a state dict
without it, so ``te_model.load_state_dict(local_to_te_state_dict(sd))`` is strict-clean either way.
The same choice holds for checkpoints: TE modules' ``sharded_state_dict`` skip ``_extra_state``
(FP8 amax history is re-estimated within a few steps after a load), which keeps TE and local
checkpoints interchangeable under strict loading.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

# (fused linear's path inside a layer, the local norm it absorbs)
FUSED_NORM_SLOTS: tuple[tuple[str, str], ...] = (
    ("self_attention.linear_qkv", "input_layernorm"),
    ("mlp.linear_fc1", "pre_mlp_layernorm"),
    ("cross_attention.linear_q", "pre_cross_attn_layernorm"),
)
_TE_NORM_PARAMS = {"layer_norm_weight": "weight", "layer_norm_bias": "bias"}
EXTRA_STATE = "_extra_state"
_IN_A_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


class KeyMapError(KeyError):
    """Two source keys map to the same target key."""


def local_norm_prefix(linear_prefix: str) -> str | None:
    """The local norm's prefix for a fused linear's prefix, or None when it has no local twin.

    Example:
        >>> local_norm_prefix("decoder.layers.3.self_attention.linear_qkv.")
        'decoder.layers.3.input_layernorm.'
    """
    for linear, norm in FUSED_NORM_SLOTS:
        suffix = f"{linear}."
        if linear_prefix == suffix or linear_prefix.endswith(f".{suffix}"):
            return linear_prefix[: len(linear_prefix) - len(suffix)] + f"{norm}."
    return None


def _put(out: dict[str, Any], key: str, value: Any, source: str) -> None:
    if key in out:
        raise KeyMapError(
            f"state-dict key {key!r} (mapped from {source!r}) is already present: the state dict holds both "
            "the fused (TE) and the separate (local) norm. Fix: pass a state dict from one spec only."
        )
    out[key] = value


def _is_empty_extra_state(value: Any) -> bool:
    return value is None or (isinstance(value, torch.Tensor) and value.numel() == 0)


def te_to_local_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a TE spec model's ``state_dict()`` to the local spec's names.

    Fused norm parameters move to their local norm (table in the module docstring);
    ``_extra_state`` entries are dropped (a warning names any that held FP8 state).

    Args:
        state_dict: the TE model's ``state_dict()`` (any prefix: ``decoder.layers.N.`` or
            ``module.decoder.layers.N.`` alike).

    Returns:
        A new dict, same insertion order, same tensor objects.

    Raises:
        KeyMapError: a local norm key would be written twice.
    """
    out: dict[str, Any] = {}
    dropped_fp8: list[str] = []
    for key, value in state_dict.items():
        module, _, name = key.rpartition(".")
        if name == EXTRA_STATE:
            if not _is_empty_extra_state(value):
                dropped_fp8.append(key)
            continue
        if name in _TE_NORM_PARAMS:
            norm = local_norm_prefix(f"{module}.")
            if norm is not None:
                _put(out, f"{norm}{_TE_NORM_PARAMS[name]}", value, key)
                continue
        _put(out, key, value, key)
    if dropped_fp8:
        logger.warning(
            "te_to_local_state_dict: dropped FP8 scaling state (_extra_state) of %d TE modules, e.g. %s; "
            "the local spec has no FP8 state", len(dropped_fp8), dropped_fp8[0],
        )
    return out


def local_to_te_state_dict(
    state_dict: Mapping[str, Any], *, fused_norms: bool = True, with_extra_state: bool = False
) -> dict[str, Any]:
    """Rename a local spec model's ``state_dict()`` to the TE spec's names.

    A local norm is moved into the linear that follows it only when that linear is in the state
    dict (``<layer>.self_attention.linear_qkv.weight`` for ``input_layernorm`` ...), so a block's
    ``final_layernorm`` and norms of layers without such a linear keep their names.

    Args:
        state_dict: the local model's ``state_dict()``.
        fused_norms: the TE spec fuses the pre-norms into the linears (GPT, Llama, T5). False for
            TE specs with separate norms (BERT's post-norm layers): names then stay as they are.
        with_extra_state: also add an empty ``_extra_state`` for every module of the TE layers
            (each parameter-holding module inside ``layers.N``, and each attention core), so the
            keys equal a freshly built TE model's ``state_dict()`` keys (a fused TE activation op
            aside). Not needed for loading: the TE wrappers accept a state dict without it.

    Returns:
        A new dict with the same tensor objects.

    Raises:
        KeyMapError: a TE key would be written twice.
    """
    moves: dict[str, str] = {}  # local norm prefix -> fused linear prefix
    for key in state_dict if fused_norms else ():
        for linear, norm in FUSED_NORM_SLOTS:
            tail = f"{linear}.weight"
            if key == tail or key.endswith(f".{tail}"):
                layer = key[: len(key) - len(tail)]
                moves[f"{layer}{norm}."] = f"{layer}{linear}."
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        module, _, name = key.rpartition(".")
        target = moves.get(f"{module}.")
        if target is not None and name in ("weight", "bias"):
            _put(out, f"{target}layer_norm_{name}", value, key)
        else:
            _put(out, key, value, key)
    if with_extra_state:
        for module in _te_layer_modules(out):
            _put(out, f"{module}.{EXTRA_STATE}", torch.empty(0, dtype=torch.uint8), module)
    return out


def _te_layer_modules(state_dict: Mapping[str, Any]) -> list[str]:
    """Module paths that a TE layer spec builds from TE classes, in first-seen order."""
    modules: dict[str, None] = {}
    for key in state_dict:
        module, _, name = key.rpartition(".")
        if name in ("weight", "layer_norm_weight") and _IN_A_LAYER.search(key):
            if module.endswith(".linear_proj"):  # its attention's core is a TE module without weights
                modules[module[: -len("linear_proj")] + "core_attention"] = None
            modules[module] = None
    return list(modules)
