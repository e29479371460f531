"""A tqdm bar (bytes, rate) on rank 0 for saves and loads that take more than ~2 s.

Shown only when stderr is a terminal; off with ``progress=False`` or ``MCORE_CKPT_PROGRESS=0``.
tqdm's ``delay`` keeps quick saves and loads silent.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import Any

from tqdm import tqdm

from megatron_core.dist_checkpointing import comm

PROGRESS_ENV = "MCORE_CKPT_PROGRESS"
DELAY_S = 2.0


def progress_wanted(enabled: bool | None) -> bool:
    """The argument when given, else ``$MCORE_CKPT_PROGRESS`` (default on); rank 0 and a tty only."""
    if enabled is None:
        enabled = os.environ.get(PROGRESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off", "")
    return bool(enabled) and comm.rank() == 0 and sys.stderr.isatty()


class Progress:
    """Byte counter; a context manager that shows a bar while entered (when wanted)."""

    def __init__(self, desc: str, total_bytes: int, enabled: bool | None = None) -> None:
        self.desc, self.total = desc, total_bytes
        self.active = progress_wanted(enabled)
        self._bar: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        if self.active:
            self._bar = tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                             delay=DELAY_S, leave=False, file=sys.stderr, dynamic_ncols=True)
        return self

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(nbytes)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
