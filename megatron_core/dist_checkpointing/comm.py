"""The few collectives save/load need, which degrade to no-ops in a single process.

Saves run their collectives on a gloo group of their own (``checkpoint_group``): a background
save then never interleaves with training collectives on the default group, and a rank that died
mid-save makes the others raise after the group's timeout instead of hanging forever.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed import ProcessGroup

TIMEOUT_ENV = "MCORE_CKPT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_groups: dict[float, tuple[Any, Any]] = {}  # timeout -> (the default group it was made under, group)
_lock = threading.Lock()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def resolve_timeout(timeout_s: float | None) -> float:
    """``timeout_s``, else ``$MCORE_CKPT_TIMEOUT_S``, else 600 s."""
    if timeout_s is not None:
        value = float(timeout_s)
    else:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"checkpoint timeout must be > 0 seconds, got {value}")
    return value


def checkpoint_group(timeout_s: float) -> Any:
    """The gloo group (all ranks) for checkpoint collectives with this timeout; None alone.

    Created on first use; every rank must ask at the same point (``save``/``async_save`` are
    collective), as for any ``new_group``. Recreated after the default group is re-initialised.
    """
    if not is_distributed():
        return None
    world = dist.group.WORLD
    with _lock:
        made_under, group = _groups.get(timeout_s, (None, None))
        if made_under is not world:  # identity: the stored reference keeps an old id from being reused
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            _groups[timeout_s] = (world, group)
        return group


def all_gather_object(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, by rank (also a barrier)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
