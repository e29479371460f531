"""Pipeline bubble of our 1F1B schedules, measured against the theory (p - 1) / (m + p - 1) (interleaved:
(p - 1) / (v * m + p - 1)).

Each of ``p`` CPU processes (gloo) is one pipeline stage whose forward sleeps ``--forward-ms`` and
whose backward sleeps ``--backward-ms``, so a stage's compute cost is fixed and known, and the
processes do not compete for the CPU. With ``m`` micro-batches a perfect 1F1B step takes
``(m + p - 1) * (t_f + t_b)``; the bubble is the idle share of that time::

    bubble = 1 - m * (t_f + t_b) / step_time

Whatever the measured bubble exceeds the theory by is the schedule's own overhead (point-to-point
transfers with their shape headers, Python, process wake-ups).

Usage::

    .venv/bin/python bench/pipeline_bubble.py                       # p in {2, 4}, m in {1, 2, 4, 8, 16}
    .venv/bin/python bench/pipeline_bubble.py --stages 4 --micro-batches 4 8 --forward-ms 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core import parallel_state  # noqa: E402
from megatron_core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron_core.testing import run_distributed  # noqa: E402

HIDDEN, SEQ, MBS = 16, 8, 2


class _FixedCost(torch.autograd.Function):
    """Identity whose forward and backward each sleep a fixed time (a stage of known cost)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_s)
        return grad, None, None


class _Config:
    """The fields of TransformerConfig the schedule reads."""

    hidden_size = HIDDEN
    sequence_parallel = False
    bf16 = False
    fp16 = False
    torch_dtype = torch.float32


class SleepStage(torch.nn.Module):
    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.config = _Config()
        self.scale = torch.nn.Parameter(torch.ones(HIDDEN))
        self.costs = (forward_s, backward_s)
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.input_tensor is None else self.input_tensor  # [s, b, h]
        return _FixedCost.apply(h * self.scale, *self.costs)


def _forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    x = next(data_iterator)

    def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output.float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    return model(x), loss_func


def _measure(stages: int, micro_batches: list[int], forward_s: float, backward_s: float,
             repeats: int) -> dict[int, float]:
    """On every rank: fastest step time (max over ranks) per micro-batch count."""
    parallel_state.initialize_model_parallel(1, stages)
    torch.manual_seed(0)
    x = torch.randn(SEQ, MBS, HIDDEN)
    stage = SleepStage(forward_s, backward_s)
    schedule = get_forward_backward_func()
    out: dict[int, float] = {}
    for m in micro_batches:
        times = []
        for _ in range(repeats + 1):  # the first run warms up the process groups
            dist.barrier()
            start = time.perf_counter()
            schedule(forward_step_func=_forward_step, data_iterator=iter([x] * m), model=stage, num_microbatches=m,
                     seq_length=SEQ, micro_batch_size=MBS)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item())
            stage.zero_grad(set_to_none=True)
        out[m] = min(times[1:])  # other load on the machine only ever adds time
    return out


def _measure_interleaved(stages: int, virtual: int, micro_batches: list[int], forward_s: float, backward_s: float,
                         repeats: int) -> dict[int, float]:
    """Interleaved 1F1B: ``virtual`` chunks per rank, each costing 1/virtual of a stage."""
    parallel_state.initialize_model_parallel(1, stages, virtual_pipeline_model_parallel_size=virtual)
    torch.manual_seed(0)
    x = torch.randn(SEQ, MBS, HIDDEN)
    chunks = [SleepStage(forward_s / virtual, backward_s / virtual) for _ in range(virtual)]
    schedule = get_forward_backward_func()
    out: dict[int, float] = {}
    for m in micro_batches:
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            schedule(forward_step_func=_forward_step, data_iterator=[iter([x] * m) for _ in chunks], model=chunks,
                     num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item())
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
        out[m] = min(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--backward-ms", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--virtual", type=int, nargs="*", default=[2],
                        help="virtual pipeline sizes v for interleaved 1F1B rows (m a multiple of p only)")
    args = parser.parse_args()
    tf, tb = args.forward_ms / 1e3, args.backward_ms / 1e3

    print(f"1F1B pipeline bubble, CPU processes (gloo), fixed-cost stages: forward {args.forward_ms:g} ms, "
          f"backward {args.backward_ms:g} ms per micro-batch; fastest of {args.repeats} steps\n")
    print("Interleaved rows (v > 1): each rank holds v chunks of 1/v the cost; the idle share falls to "
          "(p-1)/(v*m+p-1), i.e. a bubble of (p-1)/(v*m) of the compute time.\n")
    print("| stages p | chunks v | micro-batches m | ideal step (ms) | measured step (ms) | bubble theory "
          "(p-1)/(v*m+p-1) | bubble measured | overhead vs ideal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in args.stages:
        rows = {1: run_distributed(_measure, p, p, args.micro_batches, tf, tb, args.repeats, timeout=600)[0]}
        for v in args.virtual:
            counts = [m for m in args.micro_batches if m % p == 0]
            if v > 1 and counts:
                rows[v] = run_distributed(_measure_interleaved, p, p, v, counts, tf, tb, args.repeats, timeout=600)[0]
        for v, measured in rows.items():
            for m, step in measured.items():
                ideal = (m + (p - 1) / v) * (tf + tb)
                theory = (p - 1) / (v * m + p - 1)
                bubble = 1 - m * (tf + tb) / step
                overhead = f"{(step / ideal - 1) * 100:+.1f}%"
                print(f"| {p} | {v} | {m} | {ideal * 1e3:.0f} | {step * 1e3:.1f} | {theory:.3f} | {bubble:.3f} "
                      f"| {overhead} |")


if __name__ == "__main__":
    main()
