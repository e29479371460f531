"""Shard-aware initialisation, plus every ``torch.nn.init`` function under its usual name.

``shard_init_helper_(init, shard, dim=...)`` fills a tensor-parallel shard with exactly the values
that ``init`` would give the *full* tensor, sliced: the full tensor is drawn on the CPU in fp32 from
the default generator (seeded the same on every TP rank) and each rank keeps its part. Fan-based
initialisers (kaiming, xavier) therefore see the full fan-in/out, and a seed gives the same model
at every TP size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_core.nn._base import local_slice, tp_rank, tp_size
from megatron_core.nn.parallel_dim import get_parallel_dim

__all__ = ["shard_init_helper_"]

_UNSET: Any = object()


def shard_init_helper_(
    init_method: Callable[..., Any], tensor: torch.Tensor, dim: int | None = _UNSET, **kwargs: Any
) -> torch.Tensor:
    """Initialise ``tensor`` (this rank's shard) as the matching slice of an initialised full tensor.

    Args:
        init_method: an in-place initialiser such as ``torch.nn.init.kaiming_uniform_``.
        tensor: the local shard (a parameter of a split layer, or any tensor).
        dim: the dimension the shard was split along; by default the tensor's own tag
            (``get_parallel_dim``). None: the tensor is whole and is initialised directly.
        **kwargs: passed to ``init_method`` (e.g. ``a=math.sqrt(5)``).

    Returns:
        ``tensor``, filled.
    """
    if dim is _UNSET:
        dim = get_parallel_dim(tensor)
    world = tp_size()
    if dim is None or world == 1:
        with torch.no_grad():
            init_method(tensor, **kwargs)
        return tensor
    dim = dim % tensor.dim()
    full_shape = list(tensor.shape)
    full_shape[dim] *= world
    # fp32 on the CPU generator: the same draw on every rank, at every TP size, on any device.
    full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        init_method(full, **kwargs)
        tensor.copy_(local_slice(full, dim, tp_rank(), world))
    return tensor


def __getattr__(name: str) -> Any:
    """Fall back to ``torch.nn.init`` (``init.normal_``, ``init.xavier_uniform_``...)."""
    try:
        return getattr(torch.nn.init, name)
    except AttributeError:
        raise AttributeError(f"module 'megatron_core.nn.init' has no attribute {name!r}") from None
