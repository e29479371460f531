"""``run_distributed``: run a function on N real processes joined by gloo, collect what they return.

Used by every parallel test (and usable in users' own tests)::

    def check(tp):
        parallel_state.initialize_model_parallel(tp)
        return dist.get_rank()

    assert run_distributed(check, 2, 2) == [0, 1]

Processes start from a fork server that has imported torch once, so each test pays milliseconds,
not seconds, per process. They meet through a file store in ``tmp_dir`` (pytest's ``tmp_path``
when given). A rank that raises makes the call raise ``DistributedTestError`` with that rank's
number and traceback; a hang past ``timeout`` kills every rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PRELOAD = ["torch", "torch.distributed", "megatron_core"]


class DistributedTestError(RuntimeError):
    """A rank raised, or the ranks did not finish in time."""


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, args: tuple[Any, ...],
            results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share few cores: avoid oversubscription
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        out = fn(*args)
        # Plain pickle copies tensors by value: no shared-memory handles that die with this process.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 240.0,
    tmp_dir: str | Path | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo processes; return each rank's result, by rank.

    ``fn`` must be importable (a module-level function) because ranks are separate processes.
    """
    ctx = _context()
    owned_tmp = None
    if tmp_dir is None:
        owned_tmp = tempfile.TemporaryDirectory(prefix="run_distributed-")
        tmp_dir = owned_tmp.name
    store = Path(tmp_dir) / f"store-{os.getpid()}-{id(fn)}-{os.urandom(4).hex()}"
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, str(store), args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected) - {r for r, _ in failures})
                raise DistributedTestError(
                    f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s"
                    + (f"; rank {failures[0][0]} failed first:\n{failures[0][1]}" if failures else "")
                ) from None
            if ok:
                collected[rank] = pickle.loads(payload)
            else:
                failures.append((rank, payload))
                # The other ranks are probably blocked in a collective with this one: stop waiting.
                break
        if failures:
            rank, tb = failures[0]
            raise DistributedTestError(f"rank {rank} of {world_size} raised:\n{tb}")
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        if owned_tmp is not None:
            owned_tmp.cleanup()
    return [collected[r] for r in range(world_size)]
