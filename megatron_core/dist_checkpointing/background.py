"""Saving in the background (``async_save``, in ``serialization.py``): the handle, the one pending
save per process, and the snapshot.

``async_save`` returns once this rank holds a private snapshot.

The call plans the save with every rank (validation errors raise right there, on every rank),
copies each tensor this rank writes into host memory (pinned, for GPU tensors) and serialises its
objects, then returns an ``AsyncSaveHandle``: the caller may change parameters and optimizer state
at once, the checkpoint holds the values at the call. Writing, fsync, the success vote and rank 0's
commit (the protocol and format of ``save``) run in a background thread, with collectives on the
checkpoint's own gloo group.

A thread, not a process: tensorstore encodes, checksums and writes on its own threads with the GIL
released, and fsync releases it too, so the Python left in the background is small (planning of
I/O and a few collectives); measured in ``bench/checkpoint_bench.py``, a training step slows by the
figure in the README while a save writes. A process would have to receive the snapshot through
shared memory (another full copy, or pinning the caller's tensors) and join the gloo group itself.

At most one save is in flight per process: every save (sync or async) first waits for the previous
one, and raises its failure if nobody has seen it yet. A save still pending when the interpreter
exits is waited for (an exit hook that runs before thread pools shut down; it logs a failure).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from pathlib import Path

import torch

from megatron_core.dist_checkpointing.errors import SaveFailedError
from megatron_core.dist_checkpointing.save_job import SaveJob

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_pending: AsyncSaveHandle | None = None
_atexit_registered = False


class AsyncSaveHandle:
    """A save running in the background. ``wait()`` until committed; ``done()`` to poll."""

    def __init__(self, job: SaveJob) -> None:
        self.path = job.target
        self.rank = job.rank
        self._job = job
        self._error: BaseException | None = None
        self._seen = False  # the failure has been raised to the caller once
        self._thread = threading.Thread(target=self._run, name=f"ckpt-async-save-{job.target.name}", daemon=False)
        self.started = time.perf_counter()
        self.finished: float | None = None

    def _run(self) -> None:
        try:
            self._job.run()
        except BaseException as e:  # kept for wait(); the thread itself never raises
            self._error = e if isinstance(e, SaveFailedError) else SaveFailedError(
                f"background save of {str(self.path)!r} failed on rank {self.rank}: {type(e).__name__}: {e}")
            if not isinstance(e, SaveFailedError):
                self._error.__cause__ = e
        finally:
            self._job = None  # type: ignore[assignment]  # free the snapshot as soon as it is written
            self.finished = time.perf_counter()

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the checkpoint is committed; returns its path.

        Raises:
            SaveFailedError: the save failed (names the rank and the cause); nothing was committed.
            TimeoutError: still running after ``timeout`` seconds (it keeps running).
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the background save of {str(self.path)!r} is still running after {timeout} s")
        if self._error is not None:
            self._seen = True
            raise self._error
        return self.path


def start(job: SaveJob) -> AsyncSaveHandle:
    """Run ``job`` in the background as this process's pending save."""
    handle = AsyncSaveHandle(job)
    _set_pending(handle)
    handle._thread.start()
    return handle


def _set_pending(handle: AsyncSaveHandle) -> None:
    global _pending, _atexit_registered
    with _lock:
        _pending = handle
        if not _atexit_registered:
            # Before interpreter shutdown stops thread pools (concurrent.futures refuses new work
            # once it begins, and the write's fsync pool needs some): threading's own exit hooks run
            # first, newest first, so this one runs before the pools' hook registered at import.
            register = getattr(threading, "_register_atexit", atexit.register)
            register(_wait_at_exit)
            _atexit_registered = True


def wait_for_pending_saves() -> None:
    """Wait for this process's background save, if any.

    Raises:
        SaveFailedError: it failed and its failure was not raised by ``wait()`` before.
    """
    global _pending
    with _lock:
        handle = _pending
    if handle is None:
        return
    seen = handle._seen
    try:
        handle.wait()
    except SaveFailedError as e:
        with _lock:
            _pending = None
        if not seen:
            raise SaveFailedError(f"the previous background save failed: {e}") from e
        return
    with _lock:
        if _pending is handle:
            _pending = None


def _wait_at_exit() -> None:
    try:
        wait_for_pending_saves()
    except SaveFailedError as e:
        logger.error("background checkpoint save failed at exit: %s", e)


class Snapshot:
    """Copies tensors into memory only this save uses (pinned host memory for GPU tensors)."""

    def __init__(self) -> None:
        self.cuda = False
        self.nbytes = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach()
        self.nbytes += t.numel() * t.element_size()
        if t.device.type == "cpu":
            return t.clone(memory_format=torch.contiguous_format)
        self.cuda = True
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
