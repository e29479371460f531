"""Where one training step goes: fwd + bwd + AdamW of our GPT, by category, against the matmul limit.

Profiles one step (after warm-up) with ``torch.profiler`` and sums the self CPU time of every
operator into a category: matmuls, attention (SDPA or the blocked causal kernel, and their backward), norms/activations/elementwise,
embedding, output layer + loss (everything under the fused loss or the logits path's loss),
optimizer (``AdamW.step``), communication (c10d). Achieved throughput counts the step's FLOPs as
``6 x params x tokens`` (params without the position table; a tied head counted once) plus
attention ``12 x layers x b x s^2 x h`` (QK^T and AV, forward and backward, non-causal count).
The matmul limit is measured in the same run: the step's own GEMM shapes (every linear's forward and
its two backward products) timed alone, each with the faster of ``torch.mm`` (MKL) and oneDNN's matmul
(which our CPU fp32 linears use, see ``megatron_core.tensor_parallel.cpu_matmul``), their FLOPs over
their time.

    .venv/bin/python bench/profile_step.py                       # tiny and gpt2-small, 2 threads
    .venv/bin/python bench/profile_step.py --shapes tiny --compile
    .venv/bin/python bench/profile_step.py --fused-adamw         # the optimizer as training.fused_adamw: true

Wall times on a shared machine are noisy; the categories are shares of one profiled step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpt_vs_hf import SHAPES, Shape  # noqa: E402
from megatron_core.config import TransformerConfig  # noqa: E402
from megatron_core.models.gpt import GPTModel  # noqa: E402
from megatron_core.tensor_parallel.cpu_matmul import matmul_nt, onednn_applies  # noqa: E402
from specs.gpt import get_gpt_layer_local_spec  # noqa: E402

CATEGORIES = ("matmuls", "attention", "norms/act/elementwise", "embedding", "output layer + loss", "optimizer",
              "communication")
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::matmul",
               "mkldnn::_linear_pointwise")
# Parent events whose whole subtree belongs to one category (checked from the innermost outwards).
_SCOPES = (
    ("_LinearCrossEntropy", "output layer + loss"),
    ("_VocabParallelCrossEntropy", "output layer + loss"),
    ("scaled_dot_product", "attention"),
    ("_BlockedCausalAttention", "attention"),
    ("Optimizer.step", "optimizer"),
    ("aten::embedding", "embedding"),
)


def category(event) -> str:
    """Category of one profiler event: its innermost scope, else its operator name."""
    parent = event
    while parent is not None:
        for marker, name in _SCOPES:
            if marker in parent.name:
                return name
        parent = parent.cpu_parent
    if event.name.startswith(("c10d::", "gloo", "record_param_comms")):
        return "communication"
    if event.name in _MATMUL_OPS:
        return "matmuls"
    return "norms/act/elementwise"


def build(shape: Shape, compile_layers: bool, dropout: float = 0.0) -> GPTModel:
    config = TransformerConfig(num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                               hidden_dropout=dropout, attention_dropout=dropout)
    model = GPTModel(config, get_gpt_layer_local_spec(), shape.vocab, shape.seq)
    if compile_layers:
        from megatron_core.training.compile import compile_layers as compile_fn

        compile_fn(model)
    return model.train()


def step_flops(model: GPTModel, shape: Shape) -> float:
    params = sum(p.numel() for n, p in model.named_parameters() if "position_embeddings" not in n)
    tokens = shape.batch * shape.seq
    attention = 12 * shape.layers * shape.batch * shape.seq**2 * shape.hidden
    return 6.0 * params * tokens + attention


def matmul_limit(shape: Shape, repeats: int = 3) -> float:
    """GFLOP/s of the step's GEMM shapes run alone: sum of FLOPs / sum of best times (MKL or oneDNN)."""
    t, h, ffn, v = shape.batch * shape.seq, shape.hidden, 4 * shape.hidden, shape.vocab
    linears = [(h, 3 * h)] + [(h, h)] + [(h, ffn), (ffn, h)]  # per layer: qkv, proj, fc1, fc2
    gemms = []
    for k, n in linears:
        gemms += [(t, k, n), (t, n, k), (k, t, n)]  # forward, input grad, weight grad
    gemms = [g for g in gemms for _ in range(shape.layers)] + [(t, h, v), (t, v, h), (v, t, h)]
    total_flops = total_time = 0.0
    cache: dict[tuple[int, int, int], float] = {}
    for m, k, n in gemms:
        if (m, k, n) not in cache:
            a, b = torch.randn(m, k), torch.randn(k, n)
            kernels = [torch.mm] + ([lambda x, y: matmul_nt(x, y.t())] if onednn_applies("onednn", a) else [])
            best = float("inf")
            for kernel in kernels:
                kernel(a, b)
                for _ in range(repeats):
                    start = time.perf_counter()
                    kernel(a, b)
                    best = min(best, time.perf_counter() - start)
            cache[(m, k, n)] = best
        total_flops += 2.0 * m * k * n
        total_time += cache[(m, k, n)]
    return total_flops / total_time / 1e9


def profile_shape(shape: Shape, args: argparse.Namespace) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build(shape, args.compile, args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if args.fused_adamw else {}))
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    positions = torch.arange(shape.seq).expand(shape.batch, -1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(tokens, positions, None, labels=labels).mean().backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_cat: dict[str, float] = defaultdict(float)
    for event in prof.events():
        by_cat[category(event)] += event.self_cpu_time_total / 1e6
    total = sum(by_cat.values())
    best = min(times)
    achieved = step_flops(model, shape) / best / 1e9
    limit = matmul_limit(shape)
    extras = (" (compiled layers)" if args.compile else "") + (" (fused AdamW)" if args.fused_adamw else "")
    extras += f" (dropout {args.dropout})" if args.dropout else ""
    print(f"\n### {shape.name}{extras}: step {best * 1e3:.0f} ms (best of "
          f"{args.steps}), {achieved:.1f} GFLOP/s = {100 * achieved / limit:.0f}% of the matmul limit "
          f"{limit:.1f} GFLOP/s measured in this run\n")
    print("| category | ms (profiled step) | share |")
    print("|---|---:|---:|")
    for name in CATEGORIES:
        print(f"| {name} | {by_cat[name] * 1e3:.0f} | {100 * by_cat[name] / total:.0f}% |")
    return {"step_ms": best * 1e3, "gflops": achieved, "limit": limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of every TransformerLayer")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (training.fused_adamw)")
    parser.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, fwd+bwd+AdamW")
    for name in args.shapes:
        profile_shape(SHAPES[name], args)


if __name__ == "__main__":
    main()
