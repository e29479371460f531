"""Checkpoint save/load: our tensorstore format vs ``torch.save``/``torch.load`` vs ``torch.distributed.checkpoint``.

A GPT-2-small GPTModel (124M parameters, fp32, vocabulary padded to 50304 as Megatron does) at
TP=1 (one process) and TP=2 (two gloo processes), in the same run and on the same disk:

* save: ours (every file fsync'd, crc32c per inner chunk) vs ``torch.save`` of the same local
  tensors (one file per rank, no fsync; with fsync reported too) vs DCP (DTensors sharded like
  ours, so that DCP can reshard too);
* the durable floor: the same bytes written back to back into one file per rank, then fsync'd
  (no format, no checksums): about the least a durable save costs on that disk;
* the first save of a fresh process (imports and model building not timed), reported separately;
* load at the same TP, and resharding loads TP=2 -> TP=1 and TP=1 -> TP=2 (ours and DCP);
* async save (TP=1, with the AdamW model being trained): the blocking time of ``async_save`` vs
  ``torch.save`` + fsync (reused snapshot buffers; the first save's fresh ones reported apart), the
  time to commit vs a sync ``save``, and training steps run while a background save writes vs
  steps without one;
* the background writer as a thread (``async_save``) vs as a spawned process fed through shared
  memory (in a fresh, non-daemonic process): blocking, time to commit while training, step
  slowdown, and CPU seconds per save (robust to other load);
* peak extra memory during a load (VmHWM after resetting it, fresh process, glibc's mmap threshold
  fixed at 1 MiB so that freed memory is not silently reused), as a multiple of the rank's shard.
  ``torch.load`` and ours return new tensors; DCP loads in place into preallocated ones.

Files were just written, so loads read from the page cache for every method alike. Each timing
is the min (and median) over ``--repeats`` runs, methods interleaved, wall time between barriers.

    .venv/bin/python bench/checkpoint_bench.py                # ~2-3 minutes on 2 cores
    .venv/bin/python bench/checkpoint_bench.py --repeats 5 --dir /path/on/the/disk/to/measure
    .venv/bin/python bench/checkpoint_bench.py --only-async   # just the async-save and writer tables
    .venv/bin/python bench/checkpoint_bench.py --skip-writer  # without the thread-vs-process table
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core import dist_checkpointing as dc  # noqa: E402
from megatron_core import parallel_state as ps  # noqa: E402
from megatron_core.config import TransformerConfig  # noqa: E402
from megatron_core.models.gpt import GPTModel  # noqa: E402
from megatron_core.tensor_parallel.random import model_parallel_manual_seed  # noqa: E402
from megatron_core.testing import run_distributed  # noqa: E402
from specs.gpt import get_gpt_layer_local_spec  # noqa: E402

VOCAB = 50304


def gpt2_small(tp: int) -> GPTModel:
    cfg = TransformerConfig(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072,
                            hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp)
    model_parallel_manual_seed(0)
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=1024)


# ----------------------------------------------------------------------------------- measuring
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak resident memory above the level before it."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - base


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def timed(fn: Callable[[], Any]) -> float:
    _barrier()
    t0 = time.perf_counter()
    fn()
    _barrier()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------- methods
def _dcp_state(sharded: dict[str, Any], empty: bool = False) -> dict[str, Any]:
    """The same local tensors as DTensors (Shard on the split axis, else Replicate) for DCP."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    tp = ps.get_tensor_model_parallel_world_size()
    out: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (tp,)) if tp > 1 else None
    for key, st in sharded.items():
        data = torch.empty_like(st.data) if empty else st.data
        if mesh is None:
            out[key] = data
            continue
        split = [a for a, f in enumerate(st.axis_fragmentations or ()) if f > 1]
        placement = Shard(split[0]) if split else Replicate()
        out[key] = DTensor.from_local(data, mesh, [placement], run_check=False)
    return out


def _torch_save(obj: Any, path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _raw_write_fsync(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The durable floor: the tensors' bytes written back to back into one file, then fsync."""
    with open(path, "wb", buffering=0) as f:
        for t in tensors.values():
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
        os.fsync(f.fileno())


def _rank_file(root: Path, name: str) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return root / f"{name}_rank{rank}.pt"


def bench_rank(tp: int, root: str, repeats: int, reshard_from: int | None, same_tp: bool = True) -> dict[str, Any]:
    """One TP setting, on every rank: saves and same-TP loads, and/or loads of another TP's checkpoints."""
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // tp))
    ps.initialize_model_parallel(tp)
    base = Path(root)
    model = gpt2_small(tp)
    sharded = model.sharded_state_dict()
    local = {k: v.data for k, v in sharded.items()}
    shard_bytes = sum(t.numel() * t.element_size() for t in local.values())
    dcp_state = _dcp_state(sharded)
    times: dict[str, list[float]] = {}
    ours, dcp_dir = base / f"ours_tp{tp}_r0", base / f"dcp_tp{tp}_r0"

    def record(name: str, fn: Callable[[], Any]) -> None:
        times.setdefault(name, []).append(timed(fn))

    request = model.sharded_state_dict()
    dcp_dest = _dcp_state(sharded, empty=True)
    for r in range(repeats if same_tp else 0):
        # every repeat writes new files (deleting old ones would load the disk during later timings)
        saves = [("save ours", lambda r=r: dc.save(sharded, base / f"ours_tp{tp}_r{r}")),
                 ("save torch", lambda r=r: _torch_save(local, _rank_file(base, f"torch_tp{tp}_r{r}"), False)),
                 ("save torch+fsync", lambda r=r: _torch_save(local, _rank_file(base, f"torchsync_tp{tp}_r{r}"), True)),
                 ("save dcp", lambda r=r: dcp.save(dcp_state, checkpoint_id=str(base / f"dcp_tp{tp}_r{r}"))),
                 ("save raw+fsync", lambda r=r: _raw_write_fsync(local, _rank_file(base, f"raw_tp{tp}_r{r}")))]
        for name, fn in saves[r % 5:] + saves[:r % 5]:  # rotate the order: noise hits all alike
            record(name, fn)
    for r in range(repeats if same_tp else 0):
        loads = [("load ours", lambda: dc.load(request, ours)),
                 ("load torch", lambda: torch.load(_rank_file(base, f"torch_tp{tp}_r0"), weights_only=True)),
                 ("load dcp", lambda: dcp.load(dcp_dest, checkpoint_id=str(dcp_dir)))]
        for name, fn in loads[r % 3:] + loads[:r % 3]:
            record(name, fn)
    if reshard_from is not None:
        for _ in range(repeats):
            record(f"reshard ours {reshard_from}->{tp}", lambda: dc.load(request, base / f"ours_tp{reshard_from}_r0"))
            record(f"reshard dcp {reshard_from}->{tp}",
                   lambda: dcp.load(dcp_dest, checkpoint_id=str(base / f"dcp_tp{reshard_from}_r0")))
    return {"times": times, "shard_bytes": shard_bytes}


def memory_rank(tp: int, root: str, method: str, src_tp: int) -> float:
    """In a fresh process (allocator state matters): peak extra memory of one load / this rank's shard."""
    import torch.distributed.checkpoint as dcp

    ps.initialize_model_parallel(tp)
    model = gpt2_small(tp)
    sharded = model.sharded_state_dict()
    shard_bytes = sum(v.data.numel() * v.data.element_size() for v in sharded.values())
    base = Path(root)
    if method == "ours":
        _, extra = peak_extra_bytes(lambda: dc.load(sharded, base / f"ours_tp{src_tp}_r0"))
    elif method == "torch":
        _, extra = peak_extra_bytes(lambda: torch.load(_rank_file(base, f"torch_tp{tp}_r0"), weights_only=True))
    else:
        dest = _dcp_state(sharded, empty=True)
        _, extra = peak_extra_bytes(lambda: dcp.load(dest, checkpoint_id=str(base / f"dcp_tp{src_tp}_r0")))
    return extra / shard_bytes


# ----------------------------------------------------------------------------------- bytes read
def _rchar() -> int:
    return int(Path("/proc/self/io").read_text().split()[1])  # "rchar: N": bytes read by syscalls


def bytes_read_quarter(directory: Path) -> dict[str, float]:
    """MiB a TP=4 rank reads from a TP=1 checkpoint (a quarter of every tensor, along axis 0 for
    column-parallel-like and axis 1 for row-parallel-like weights), with and without inner chunks."""
    from megatron_core.dist_checkpointing import plan_cache, save_job

    model = gpt2_small(1)
    sharded = model.sharded_state_dict()
    request = {}
    needed = 0
    for key, st in sharded.items():
        axis = 1 if "linear_proj.weight" in key or "linear_fc2.weight" in key else 0
        piece = st.data.chunk(4, axis)[0]
        request[key] = dc.ShardedTensor.from_rank_offsets(key, torch.empty_like(piece), (axis, 0, 4))
        needed += piece.numel() * piece.element_size()
    out = {"needed": needed / 2**20}
    real = plan_cache.choose_inner_chunk_shape
    for name, inner in (("ours", real), ("no inner chunks", lambda chunk, *a, **k: tuple(chunk))):
        plan_cache.choose_inner_chunk_shape = inner
        save_job._plan_cache.clear()  # the same structure: plan afresh, with this layout
        try:
            dc.save(sharded, directory / f"quarter_{name}")
        finally:
            plan_cache.choose_inner_chunk_shape = real
        before = _rchar()
        dc.load(request, directory / f"quarter_{name}")
        out[name] = (_rchar() - before) / 2**20
    return out


# ----------------------------------------------------------------------------------- fresh process
def first_save(method: str, directory: str) -> None:
    """In this fresh process: build the TP=1 model (not timed), time the first save; print JSON."""
    model = gpt2_small(1)
    sharded = model.sharded_state_dict()
    local = {k: v.data for k, v in sharded.items()}
    t0 = time.perf_counter()
    if method == "ours":
        dc.save(sharded, Path(directory) / "first_ours")
    elif method == "torch":
        _torch_save(local, Path(directory) / "first_torch.pt", False)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(local, checkpoint_id=str(Path(directory) / "first_dcp"))
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def fresh_first_save(method: str, directory: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--first-save", method, "--dir", str(directory)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def fresh_memory(method: str, src_tp: int, tp: int, directory: Path) -> float:
    """``memory_rank`` in new processes whose glibc maps (and unmaps) every allocation >= 1 MiB:
    freed memory is returned at once, so the peak RSS counts what a load really allocates."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, __file__, "--memory", method, str(src_tp), str(tp), "--dir", str(directory)],
                         capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["ratio"])


# ----------------------------------------------------------------------------------- report
# ----------------------------------------------------------------------------------- async save
def _train_setup(batch: int = 1, seq: int = 64) -> tuple[GPTModel, Callable[[], float]]:
    """The TP=1 model with AdamW and one timed training step (the state saved is the model's).
    A small batch: several steps fit in one background save, so the steps that overlap it are
    measured, not one step that happens to contain it."""
    model = gpt2_small(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).expand(batch, seq)

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()
    return model, step


def bench_async(root: str, repeats: int) -> dict[str, list[float]]:
    """TP=1: async_save's blocking time and background completion, and training steps run while a
    background save writes vs steps with no save, against torch.save + fsync and a sync save."""
    torch.set_num_threads(os.cpu_count() or 2)
    ps.initialize_model_parallel(1)
    base = Path(root)
    model, step = _train_setup()
    local = {k: v.data for k, v in model.sharded_state_dict().items()}
    out: dict[str, list[float]] = {k: [] for k in ("blocking first", "blocking", "background", "sync", "torch+fsync",
                                                   "step", "step+save")}
    dc.release_snapshot_buffers()
    def background(r: int) -> None:
        t0 = time.perf_counter()
        handle = dc.async_save(model.sharded_state_dict(), base / f"async_bg_{r}")
        out["blocking first" if r == 0 else "blocking"].append(time.perf_counter() - t0)
        handle.wait()
        out["background"].append(time.perf_counter() - t0)

    for r in range(repeats):
        # the three saves in turns (the disk's write-back of one save slows the next): noise hits all alike
        saves = [lambda r=r: out["torch+fsync"].append(timed(lambda: _torch_save(local, base / f"async_torch_{r}.pt",
                                                                                 True))),
                 lambda r=r: out["sync"].append(timed(lambda: dc.save(model.sharded_state_dict(),
                                                                      base / f"async_sync_{r}"))),
                 lambda r=r: background(r)]
        for save in saves[r % 3:] + saves[:r % 3]:
            save()
        out["step"] += [step() for _ in range(3)]
        t0 = time.perf_counter()
        handle = dc.async_save(model.sharded_state_dict(), base / f"async_train_{r}")
        out["blocking"].append(time.perf_counter() - t0)
        while not handle.done():  # training goes on while the save writes
            out["step+save"].append(step())
        handle.wait()
    return out


# ----------------------------------------------------------------------------------- thread or process
def _writer_process(conn: Any, tensors: dict[str, torch.Tensor]) -> None:
    """A separate writer process: saves the shared-memory snapshot with the same ``dc.save`` (one
    process, same bytes and format) each time it is sent a path."""
    while (path := conn.recv()) is not None:
        cpu = time.process_time()
        dc.save({k: dc.ShardedTensor.from_rank_offsets(k, v) for k, v in tensors.items()}, path)
        conn.send((time.monotonic(), time.process_time() - cpu))  # monotonic: the parent's clock too (Linux)


def bench_writer(root: str, repeats: int) -> dict[str, list[float]]:
    """The background writer as a thread (``async_save``) vs as a process, same run, same model:
    blocking time, call-to-committed, and training steps while each writes. The process gets the
    snapshot through shared memory (buffers made once and reused, as the thread's are) and is
    started before timing (its start-up is reported separately)."""
    import torch.multiprocessing as mp

    torch.set_num_threads(os.cpu_count() or 2)
    ps.initialize_model_parallel(1)
    base = Path(root)
    model, step = _train_setup()
    local = {k: v.data for k, v in model.sharded_state_dict().items()}
    shared = {k: torch.empty_like(v).share_memory_() for k, v in local.items()}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_writer_process, args=(child, shared), daemon=True)
    proc.start()
    parent.send(str(base / "writer_warmup"))  # the worker's imports and first save
    parent.recv()
    out: dict[str, list[float]] = {"process start": [time.perf_counter() - t0]}
    for key in ("thread blocking", "thread committed", "thread step+save", "process blocking",
                "process committed", "process step+save", "step", "thread cpu", "process cpu"):
        out[key] = []
    dc.release_snapshot_buffers()
    dc.async_save(model.sharded_state_dict(), base / "writer_thread_warmup").wait()
    try:
        for r in range(repeats):  # CPU seconds of one save with the foreground idle (robust to other load)
            cpu = time.process_time()
            dc.async_save(model.sharded_state_dict(), base / f"writer_thread_cpu_{r}").wait()
            out["thread cpu"].append(time.process_time() - cpu)  # snapshot + the writer thread
            cpu = time.process_time()
            for k, v in local.items():
                shared[k].copy_(v)
            parent.send(str(base / f"writer_process_cpu_{r}"))
            out["process cpu"].append(time.process_time() - cpu + parent.recv()[1])  # snapshot + the process
        for r in range(repeats):
            out["step"] += [step() for _ in range(3)]
            t0 = time.perf_counter()
            handle = dc.async_save(model.sharded_state_dict(), base / f"writer_thread_{r}")
            out["thread blocking"].append(time.perf_counter() - t0)
            while not handle.done():
                out["thread step+save"].append(step())
            handle.wait()
            assert handle.finished is not None
            out["thread committed"].append(handle.finished - t0)  # when the thread finished, not the step
            t0 = time.monotonic()
            for k, v in local.items():  # the snapshot, into the reused shared buffers
                shared[k].copy_(v)
            parent.send(str(base / f"writer_process_{r}"))
            out["process blocking"].append(time.monotonic() - t0)
            while not parent.poll():
                out["process step+save"].append(step())
            out["process committed"].append(parent.recv()[0] - t0)
    finally:
        parent.send(None)
        proc.join(60)
    return out


def fresh_writer_bench(directory: Path, repeats: int) -> dict[str, list[float]]:
    out = subprocess.run([sys.executable, __file__, "--writer-bench", "--repeats", str(repeats), "--dir",
                          str(directory)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_writer(w: dict[str, list[float]]) -> str:
    mean = statistics.mean
    step = mean(w["step"])
    rows = ["| background writer (TP=1, 124M fp32) | thread (`async_save`) | process (shared memory) |",
            "|---|---|---|",
            f"| blocking, s, min (median) | {_fmt(w['thread blocking'])} | {_fmt(w['process blocking'])} |",
            f"| call to committed while training, s, min (median) | {_fmt(w['thread committed'])} | "
            f"{_fmt(w['process committed'])} |",
            f"| training step while it writes / without (mean of {len(w['thread step+save'])} / "
            f"{len(w['process step+save'])} vs {len(w['step'])} steps) | {mean(w['thread step+save']) / step:.2f}x | "
            f"{mean(w['process step+save']) / step:.2f}x |",
            f"| CPU seconds per save, foreground idle, min (median) | {_fmt(w['thread cpu'])} | "
            f"{_fmt(w['process cpu'])} |",
            f"| start-up (spawn, imports, first save) | - | {w['process start'][0]:.1f} s once |"]
    return "\n".join(rows)


def report_async(a: dict[str, list[float]]) -> str:
    mean = statistics.mean
    return "\n".join([
        "| async save (TP=1) | seconds, min (median) | ratio | target |",
        "|---|---|---|---|",
        f"| blocking time of `async_save` vs `torch.save` + fsync | {_fmt(a['blocking'])} vs {_fmt(a['torch+fsync'])} "
        f"| {_ratio(a['blocking'], a['torch+fsync'])} | <= 0.25x (goal 0.1x) |",
        f"| the same, first async save of the process (fresh snapshot buffers) | {_fmt(a['blocking first'])} | "
        f"{_ratio(a['blocking first'], a['torch+fsync'])} | - |",
        f"| call to committed (background idle) vs sync `save` | {_fmt(a['background'])} vs {_fmt(a['sync'])} "
        f"| {_ratio(a['background'], a['sync'])} | <= 1.2x |",
        f"| training step while a save writes vs without (mean of {len(a['step+save'])} / {len(a['step'])}) | "
        f"{mean(a['step+save']):.3f} vs {mean(a['step']):.3f} | {mean(a['step+save']) / mean(a['step']):.2f}x | "
        "report |",
    ])


def _fmt(values: list[float]) -> str:
    return f"{min(values):.3f} ({statistics.median(values):.3f})"


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{min(a) / min(b):.2f}x"


def report(results: dict[int, dict[str, Any]], first: dict[str, list[float]], memory: dict[str, float],
           quarter: dict[str, float], repeats: int) -> str:
    t1, t2 = results[1]["times"], results[2]["times"]
    rows = [("| setting | ours | torch.save / torch.load | DCP | ours / torch | ours / DCP |"),
            ("|---|---|---|---|---|---|")]

    def row(label: str, ours: list[float], torch_: list[float] | None, dcp_: list[float] | None) -> None:
        rows.append(f"| {label} | {_fmt(ours)} | {_fmt(torch_) if torch_ else '-'} | {_fmt(dcp_) if dcp_ else '-'} | "
                    f"{_ratio(ours, torch_) if torch_ else '-'} | {_ratio(ours, dcp_) if dcp_ else '-'} |")

    row("TP=1 first save, fresh process", first["ours"], first["torch"], first["dcp"])
    for tp, t in ((1, t1), (2, t2)):
        row(f"TP={tp} save (steady)", t["save ours"], t["save torch"], t["save dcp"])
        row(f"TP={tp} save vs torch.save + fsync", t["save ours"], t["save torch+fsync"], None)
        row(f"TP={tp} save vs raw bytes write + fsync (floor)", t["save ours"], t["save raw+fsync"], None)
        row(f"TP={tp} load (same TP)", t["load ours"], t["load torch"], t["load dcp"])
    row("TP=2 -> TP=1 load (reshard)", t1["reshard ours 2->1"], None, t1["reshard dcp 2->1"])
    row("TP=1 -> TP=2 load (reshard)", t2["reshard ours 1->2"], None, t2["reshard dcp 1->2"])
    lines = [
        f"Seconds, min (median) of {repeats} runs; wall time between barriers. torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs.",
        "",
        *rows,
        "",
        f"- resharding load TP=2 -> TP=1 / same-TP load at TP=1: "
        f"{min(t1['reshard ours 2->1']) / min(t1['load ours']):.2f}x (target <= 1.5x)",
        f"- peak extra memory during load / rank shard ({results[1]['shard_bytes'] / 2**20:.0f} MiB at TP=1, "
        f"{results[2]['shard_bytes'] / 2**20:.0f} MiB at TP=2), each in a fresh process: ours "
        f"{memory['ours 1->1']:.2f}x (TP=1), {memory['ours 2->2']:.2f}x (TP=2, max over ranks), "
        f"{memory['ours 2->1']:.2f}x (TP=2 -> TP=1); torch.load {memory['torch 1->1']:.2f}x; DCP (in place, into "
        f"preallocated tensors) {memory['dcp 1->1']:.2f}x (target <= 1.2x)",
        f"- bytes a TP=4 rank reads from the TP=1 checkpoint (a quarter of each tensor): {quarter['ours']:.0f} MiB "
        f"for {quarter['needed']:.0f} MiB needed ({quarter['ours'] / quarter['needed']:.2f}x); with one chunk per "
        f"shard and no inner chunks: {quarter['no inner chunks']:.0f} MiB "
        f"({quarter['no inner chunks'] / quarter['needed']:.2f}x)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--first-save", choices=["ours", "torch", "dcp"], help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=3, metavar=("METHOD", "SRC_TP", "TP"), help=argparse.SUPPRESS)
    parser.add_argument("--only-async", action="store_true", help="only the async-save tables")
    parser.add_argument("--skip-writer", action="store_true", help="without the thread-vs-process table")
    parser.add_argument("--writer-bench", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_save:
        first_save(args.first_save, str(args.dir))
        return
    if args.writer_bench:  # a plain (non-daemonic) process: it starts the writer process
        dist.init_process_group("gloo", init_method=f"file://{args.dir}/writer_store", rank=0, world_size=1)
        print(json.dumps(bench_writer(str(args.dir), args.repeats)))
        return
    if args.memory:
        method, src, tp = args.memory[0], int(args.memory[1]), int(args.memory[2])
        print(json.dumps({"ratio": max(run_distributed(memory_rank, tp, tp, str(args.dir), method, src,
                                                       tmp_dir=args.dir))}))
        return
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench-", dir=args.dir))
    try:
        async_times = run_distributed(bench_async, 1, str(root), args.repeats, tmp_dir=root, timeout=1800)[0]
        writer = None if args.skip_writer else fresh_writer_bench(root, args.repeats)
        if args.only_async:
            print(report_async(async_times))
            if writer is not None:
                print()
                print(report_writer(writer))
            return
        first: dict[str, list[float]] = {m: [] for m in ("ours", "torch", "dcp")}
        for _ in range(args.repeats):
            for method in first:
                first[method].append(fresh_first_save(method, root))
                for p in root.glob("first_*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        results = {2: run_distributed(bench_rank, 2, 2, str(root), args.repeats, None, tmp_dir=root, timeout=1800)[0]}
        results[1] = run_distributed(bench_rank, 1, 1, str(root), args.repeats, 2, tmp_dir=root, timeout=1800)[0]
        reshard = run_distributed(bench_rank, 2, 2, str(root), args.repeats, 1, False, tmp_dir=root, timeout=1800)[0]
        results[2]["times"].update(reshard["times"])
        memory = {f"{method} {src}->{tp}": fresh_memory(method, src, tp, root)
                  for method, src, tp in (("ours", 1, 1), ("ours", 2, 2), ("ours", 2, 1), ("torch", 1, 1),
                                          ("dcp", 1, 1))}
        quarter = bytes_read_quarter(root)
        print(report(results, first, memory, quarter, args.repeats))
        print()
        print(report_async(async_times))
        if writer is not None:
            print()
            print(report_writer(writer))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
