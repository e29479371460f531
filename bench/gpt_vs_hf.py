"""One training step (forward, backward, AdamW) of our GPT vs Hugging Face GPT-2, fp32 on CPU.

Both models have the same shape and the same weights (ours is ``from_hf`` of the Hugging Face
one, built with the local GPT spec), run in the same process, steps interleaved so that machine
noise hits both alike. Reports the median step time, tokens/s and the ratio ours / HF.

    .venv/bin/python bench/gpt_vs_hf.py                       # tiny + gpt2-small, 2 threads
    .venv/bin/python bench/gpt_vs_hf.py --shapes tiny --profile
    .venv/bin/python bench/gpt_vs_hf.py --fused-adamw          # both on torch's fused AdamW
    .venv/bin/python bench/gpt_vs_hf.py --compile              # ours with training.compile (HF eager)

Optimizer: by default both models step ``torch.optim.AdamW`` with torch's CPU default (the
per-tensor loop), which is what our Trainer uses by default (``training.fused_adamw: false``).
``--fused-adamw`` gives BOTH models ``AdamW(fused=True)``: our ``training.fused_adamw: true`` and the
Hugging Face Trainer's own default (``adamw_torch_fused`` with torch >= 2.8).

``--compile`` compiles each of OUR TransformerLayers (``training.compile: true``, inductor) and leaves
HF eager; the warm-up steps absorb the compilation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core.interop import from_hf  # noqa: E402
from megatron_core.training.compile import compile_layers  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    batch: int
    seq: int
    vocab: int


SHAPES = {
    "tiny": Shape("tiny (4L, h256, b4, s128, V1024)", 4, 256, 4, 4, 128, 1024),
    "gpt2-small": Shape("GPT-2 small (12L, h768, b2, s512, V50257)", 12, 768, 12, 2, 512, 50257),
}


def build_models(shape: Shape, dropout: float, cpu_matmul: str = "onednn") -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=shape.vocab, n_positions=shape.seq, n_embd=shape.hidden, n_layer=shape.layers,
        n_head=shape.heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=0, eos_token_id=0,
    )
    hf = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()
    ours = from_hf(hf, config_overrides={"cpu_matmul": cpu_matmul}).train()
    return ours, hf


def make_steps(
    ours: torch.nn.Module, hf: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, fused_adamw: bool = False
) -> tuple[Callable[[], float], Callable[[], float]]:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    fused = {"fused": True} if fused_adamw else {}
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, **fused)

    def step_ours() -> float:
        opt_ours.zero_grad(set_to_none=True)
        loss = ours(tokens, positions, None, labels=labels).mean()  # per-token loss [b, s]
        loss.backward()
        opt_ours.step()
        return loss.item()

    def step_hf() -> float:
        opt_hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=tokens, position_ids=positions).logits  # [b, s, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt_hf.step()
        return loss.item()

    return step_ours, step_hf


def timed(fn: Callable[[], float]) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one step.

    CPU time is reported too because it is far less sensitive than wall time to other processes
    sharing the cores (the machine this was written on is shared).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = fn()
    return time.perf_counter() - start, time.process_time() - cpu_start, loss


def profile(name: str, fn: Callable[[], float], rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n#### profile: {name} (one step, self CPU time)\n")
    print("```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print("```")


def run_shape(shape: Shape, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    ours, hf = build_models(shape, args.dropout, args.cpu_matmul)
    if args.compile:
        compile_layers(ours)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    step_ours, step_hf = make_steps(ours, hf, tokens, labels, args.fused_adamw)
    times_ours, times_hf, cpu_ours, cpu_hf, first = [], [], [], [], None
    for i in range(args.warmup + args.steps):
        # Alternate which model goes first, so that neither always inherits the other's cache state.
        if i % 2 == 0:
            t_ours, c_ours, loss_ours = timed(step_ours)
            t_hf, c_hf, loss_hf = timed(step_hf)
        else:
            t_hf, c_hf, loss_hf = timed(step_hf)
            t_ours, c_ours, loss_ours = timed(step_ours)
        if first is None:
            first = abs(loss_ours - loss_hf)
        if i >= args.warmup:
            times_ours.append(t_ours)
            times_hf.append(t_hf)
            cpu_ours.append(c_ours)
            cpu_hf.append(c_hf)
        print(f"  [{shape.name}] step {i}: ours {t_ours * 1e3:.0f} ms (cpu {c_ours * 1e3:.0f}, loss {loss_ours:.4f}), "
              f"hf {t_hf * 1e3:.0f} ms (cpu {c_hf * 1e3:.0f}, loss {loss_hf:.4f})", file=sys.stderr)
    if args.profile:
        profile(f"ours, {shape.name}", step_ours, args.profile_rows)
        profile(f"hf, {shape.name}", step_hf, args.profile_rows)
    tokens_per_step = shape.batch * shape.seq
    med_ours, med_hf = statistics.median(times_ours), statistics.median(times_hf)
    return {
        "ours_ms": med_ours * 1e3, "hf_ms": med_hf * 1e3,
        "ours_min_ms": min(times_ours) * 1e3, "hf_min_ms": min(times_hf) * 1e3,
        "cpu_ratio": statistics.median(cpu_hf) / statistics.median(cpu_ours),
        "ours_tps": tokens_per_step / med_ours, "hf_tps": tokens_per_step / med_hf,
        "ratio": med_hf / med_ours, "first_loss_diff": first or 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,gpt2-small", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout of both models (default 0)")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for both models")
    parser.add_argument("--cpu-matmul", default="onednn", choices=["onednn", "torch"],
                        help="our TransformerConfig.cpu_matmul (torch: MKL through F.linear, as HF uses)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of our layers (HF eager)")
    parser.add_argument("--profile", action="store_true", help="profile one step of each model after timing")
    parser.add_argument("--profile-rows", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    for key in args.shapes.split(","):
        results[key] = run_shape(SHAPES[key], args)

    print(f"\nOne training step (fwd + bwd + AdamW), fp32, CPU, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warmup, dropout {args.dropout}, "
          f"AdamW {'fused' if args.fused_adamw else 'per-tensor loop'} (both), our cpu_matmul {args.cpu_matmul}"
          f"{', ours compiled (training.compile), HF eager' if args.compile else ''}\n")
    print("| shape | ours ms/step | HF ms/step | ours tokens/s | HF tokens/s | ours / HF | "
          "ours / HF (min) | ours / HF (CPU time) | first-step loss diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        print(f"| {SHAPES[key].name} | {r['ours_ms']:.0f} | {r['hf_ms']:.0f} | {r['ours_tps']:.0f} | "
              f"{r['hf_tps']:.0f} | {r['ratio']:.2f}x | {r['hf_min_ms'] / r['ours_min_ms']:.2f}x | {r['cpu_ratio']:.2f}x | "
              f"{r['first_loss_diff']:.1e} |")


if __name__ == "__main__":
    main()
