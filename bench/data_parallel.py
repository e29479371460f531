"""Data parallelism: step time and exposed gradient communication with overlap off and on; optimizer memory.

``N`` CPU processes (gloo) each train a GPT of ~50M parameters (6 layers, hidden 768, vocab 8192)
on their own micro-batch, wrapped in our ``DistributedDataParallel``. Per configuration it reports
the step time and the *exposed communication*: the time ``finish_grad_sync`` still waits for the
bucket reductions after backward has ended (``ddp.last_grad_sync_wait_s``). With
``overlap_grad_reduce`` the buckets are reduced from the backward hooks while earlier layers are
still being differentiated, so that wait shrinks. Also reported: optimizer state bytes per rank of
the distributed optimizer against plain AdamW (two fp32 moments per parameter).

Usage::

    .venv/bin/python bench/data_parallel.py                 # 2 processes, 4 steps per configuration
    .venv/bin/python bench/data_parallel.py --world 4 --steps 6 --bucket-size 4000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core import TransformerConfig, parallel_state  # noqa: E402
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron_core.models.gpt import GPTModel  # noqa: E402
from megatron_core.optimizer import DistributedOptimizer  # noqa: E402
from megatron_core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron_core.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megatron_core.testing import run_distributed  # noqa: E402
from megatron_core.training import build_adamw  # noqa: E402
from specs.gpt import get_gpt_layer_local_spec  # noqa: E402

VOCAB, SEQ, MBS = 8192, 128, 2
CONFIGS = [  # (name, overlap_grad_reduce, distributed optimizer)
    ("all-reduce, overlap off", False, False),
    ("all-reduce, overlap on", True, False),
    ("dist. optimizer, overlap off", False, True),
    ("dist. optimizer, overlap on", True, True),
]


def _step_func(batch: dict[str, torch.Tensor]) -> Any:
    def forward_step(data_iterator: Any, model: torch.nn.Module) -> Any:
        del data_iterator
        out = model(batch["tokens"], batch["positions"], None, labels=batch["labels"])
        return out, lambda o: (o.float().mean(), {})

    return forward_step


def _measure(overlap: bool, distributed: bool, steps: int, bucket_size: int) -> dict[str, float]:
    model_parallel_manual_seed(0)
    config = TransformerConfig(num_layers=6, hidden_size=768, num_attention_heads=12, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
    ddp = DistributedDataParallel(model, ddp_config=DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, use_distributed_optimizer=distributed, bucket_size=bucket_size))
    optimizer = DistributedOptimizer(ddp, lr=1e-4) if distributed else build_adamw(model, lr=1e-4)
    g = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    batch = {"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "positions": torch.arange(SEQ).expand(MBS, SEQ)}
    times, waits = [], []
    for i in range(steps + 1):  # the first step warms up (allocations, lazy init)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        get_forward_backward_func()(forward_step_func=_step_func(batch), data_iterator=None, model=ddp,
                                    num_microbatches=1, seq_length=SEQ, micro_batch_size=MBS)
        optimizer.step()
        if i > 0:
            times.append(time.perf_counter() - start)
            waits.append(ddp.last_grad_sync_wait_s)
    if distributed:
        state = float(optimizer.state_bytes())  # type: ignore[attr-defined]
    else:
        state = float(sum(t.nbytes for s in optimizer.state.values() for t in s.values() if t.ndim > 0))
    return {"step_s": statistics.median(times), "wait_s": statistics.median(waits), "state_bytes": state,
            "params": float(sum(p.numel() for p in model.parameters())),
            "buckets": float(sum(len(b.buckets) for b in ddp.buffers_by_dtype))}


def _worker(steps: int, bucket_size: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(1, 1)
    return {name: _measure(overlap, distributed, steps, bucket_size) for name, overlap, distributed in CONFIGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="data-parallel processes")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (median reported)")
    parser.add_argument("--bucket-size", type=int, default=4_000_000, help="elements per gradient bucket")
    args = parser.parse_args()
    per_rank = run_distributed(_worker, args.world, args.steps, args.bucket_size, timeout=3600)
    rank0 = per_rank[0]
    base = rank0[CONFIGS[0][0]]
    print(f"GPT {base['params'] / 1e6:.1f}M params, DP={args.world} CPU processes (gloo, 1 thread each), "
          f"micro-batch {MBS}x{SEQ}, buckets of {args.bucket_size:,} elements ({int(base['buckets'])} buckets)")
    print("| configuration | step (s) | exposed grad comm (s) | exposed / overlap-off | optimizer state per rank (MB) "
          "| vs plain AdamW |")
    print("|---|---|---|---|---|---|")
    for name, _, distributed in CONFIGS:
        r = rank0[name]
        off = rank0[CONFIGS[2][0] if distributed else CONFIGS[0][0]]
        print(f"| {name} | {r['step_s']:.3f} | {r['wait_s']:.3f} | {r['wait_s'] / max(off['wait_s'], 1e-9):.2f}x "
              f"| {r['state_bytes'] / 2**20:.1f} | {r['state_bytes'] / base['state_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
