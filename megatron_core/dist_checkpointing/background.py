"""Saving in the background (``async_save``, in ``serialization.py``): the handle, the one pending
save per process, and the snapshot.

``async_save`` returns once this rank holds a private snapshot.

The call plans the save with every rank (validation errors raise right there, on every rank),
copies each tensor this rank writes into host memory (pinned, for GPU tensors) and serialises its
objects, then returns an ``AsyncSaveHandle``: the caller may change parameters and optimizer state
at once, the checkpoint holds the values at the call. Writing, fsync, the success vote and rank 0's
commit (the protocol and format of ``save``) run in a background thread, with collectives on the
checkpoint's own gloo group.

A thread, not a process, decided by measurement (``bench/checkpoint_bench.py``, table "background
writer"): the same save run by a spawned writer process that receives the snapshot through shared
memory (buffers made once and reused, so no extra copy) costs the same CPU seconds per save and
slowed the training steps that ran during it no less than the thread did (both within the noise
of a loaded machine). That is expected: tensorstore encodes, checksums and writes on its own
threads with the GIL released, crc32c and fsync release it too, so the Python left in the
background (planning of I/O, a few collectives) holds the GIL briefly. A process would add a
2-3 s start-up, a second process per rank to supervise (and kill with the rank), and its own
place in the checkpoint's gloo group for the vote and the commit; it buys nothing measurable.

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

    def __init__(self, job: SaveJob, snapshot: Snapshot | None = None) -> None:
        self.path = job.target
        self._snapshot = snapshot
        # bytes this rank copied at the call, and how many of them went into reused buffers
        self.snapshot_bytes = snapshot.nbytes if snapshot is not None else 0
        self.reused_bytes = snapshot.reused if snapshot is not None else 0
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
            if self._snapshot is not None:
                self._snapshot.recycle()  # written and committed: the next snapshot may reuse the memory
        except BaseException as e:  # kept for wait(); the thread itself never raises
            self._error = e if isinstance(e, SaveFailedError) else SaveFailedError(
                f"background save of {str(self.path)!r} failed on rank {self.rank}: {type(e).__name__}: {e}")
            if not isinstance(e, SaveFailedError):
                self._error.__cause__ = e
        finally:
            self._job = None  # type: ignore[assignment]  # free the snapshot as soon as it is written
            self._snapshot = None
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


def start(job: SaveJob, snapshot: Snapshot | None = None) -> AsyncSaveHandle:
    """Run ``job`` in the background as this process's pending save (its ``snapshot`` is recycled
    once committed)."""
    handle = AsyncSaveHandle(job, snapshot)
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


BufferKey = tuple[tuple[int, ...], torch.dtype, bool]  # shape, dtype, pinned
_free_buffers: dict[BufferKey, list[torch.Tensor]] = {}  # the last committed snapshot's, for the next one


class Snapshot:
    """Copies tensors into memory only this save uses (pinned host memory for GPU tensors).

    The copies reuse the buffers of the previous committed async save where shape and dtype match
    (training saves the same structure again and again): writing into memory already mapped
    avoids the page faults (and, on GPU, the pinning) of fresh allocations, which cost about as
    much as the copy itself. Buffers this save does not reuse are dropped, so at most one
    snapshot's worth of memory is kept between saves; ``release_snapshot_buffers()`` frees it.
    """

    def __init__(self, reuse: bool = True) -> None:
        self.cuda = False
        self.nbytes = 0
        self.reused = 0  # bytes copied into reused buffers
        self.buffers: list[torch.Tensor] = []
        with _lock:
            self._pool = _free_buffers.copy() if reuse else {}
            _free_buffers.clear()  # anything left unused once this snapshot is taken is freed

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        self.nbytes += nbytes
        pinned = t.device.type != "cpu"
        self.cuda = self.cuda or pinned
        free = self._pool.get((tuple(t.shape), t.dtype, pinned))
        if free:
            out = free.pop()
            self.reused += nbytes
        else:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        out.copy_(t, non_blocking=pinned)
        self.buffers.append(out)
        return out

    def finish(self) -> None:
        self._pool = {}
        if self.cuda:
            torch.cuda.synchronize()

    def recycle(self) -> None:
        """The save committed and nothing reads the buffers any more: keep them for the next one."""
        pool: dict[BufferKey, list[torch.Tensor]] = {}
        for b in self.buffers:
            pool.setdefault((tuple(b.shape), b.dtype, b.is_pinned()), []).append(b)
        self.buffers = []
        with _lock:
            _free_buffers.clear()
            _free_buffers.update(pool)


def release_snapshot_buffers() -> None:
    """Free the host buffers kept from the last async save for the next one's snapshot."""
    with _lock:
        _free_buffers.clear()
