"""Context parallelism on CPU processes: activation memory per rank and step time vs sequence length.

For each sequence length and CP size (1, 2, 4) the script builds a small Llama-style GPT (GQA, RoPE,
2 layers) on ``cp`` gloo processes, feeds each rank its load-balanced chunks
(``get_batch_on_this_cp_rank``) and measures one forward+backward:

* ``saved MiB/rank``: bytes autograd keeps for backward on the rank (``saved_tensors_hooks``,
  distinct storages, parameters excluded): the activation memory the step holds;
* ``score block MiB``: the attention score block a rank materialises at once, in theory:
  ``b * np * s^2 * 4`` for an unfused kernel at CP=1 (the CPU SDPA flash path holds none) and
  ``b * np * (s/2cp)^2 * 4`` per ring block;
* ``step s``: wall time of forward+backward on rank 0 (median of 3).

Theory: every activation is per token, so saved bytes per rank scale as 1/CP; attention score
memory scales as 1/CP^2 per block. The "longest sequence in budget" column takes a fixed per-rank
budget (``--budget-mib``) and extrapolates the measured bytes/token linearly.

CPU processes share the machine's cores: step times at CP>1 measure the ring's overhead and
communication, not a speed-up (all ranks compete for the same 2 cores here). Run:

    python bench/context_parallel.py --seq 4096 8192 16384 --cp 1 2 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_core import parallel_state as ps
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.context_parallel import get_batch_on_this_cp_rank
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import llama_config

MIB = 2**20
HIDDEN, HEADS, GROUPS, LAYERS, VOCAB, BATCH = 64, 4, 2, 2, 128, 1


def _saved_bytes(model: torch.nn.Module, fn) -> tuple[int, torch.Tensor]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def _one_rank(seq: int, cp: int, repeats: int) -> dict[str, float]:
    ps.initialize_model_parallel(context_parallel_size=cp)
    torch.set_num_threads(max(1, torch.get_num_threads() // cp))
    model_parallel_manual_seed(0)
    config = llama_config(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
                          ffn_hidden_size=2 * HIDDEN, context_parallel_size=cp)
    model = GPTModel(config, get_gpt_layer_local_spec(), VOCAB, seq, position_embedding_type="rope")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, seq), generator=g)
    batch = get_batch_on_this_cp_rank({"tokens": tokens, "labels": tokens.roll(-1, 1),
                                       "position_ids": torch.arange(seq).expand(BATCH, seq)})
    times, saved = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        saved, loss = _saved_bytes(model, lambda: model(batch["tokens"], batch["position_ids"], None,
                                                        labels=batch["labels"]))
        loss.sum().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {"saved": float(saved), "step": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-mib", type=float, default=64.0, help="per-rank activation budget")
    args = parser.parse_args()
    print(f"per-rank activation budget for the last column: {args.budget_mib:.0f} MiB")
    print("| seq | CP | saved MiB/rank | vs CP=1 | theory 1/CP | score block MiB (theory) | step s | vs CP=1 "
          "| longest seq in budget |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    base: dict[int, tuple[float, float]] = {}
    for seq in args.seq:
        for cp in args.cp:
            result = run_distributed(_one_rank, cp, seq, cp, args.repeats, timeout=3600) if cp > 1 else [
                _one_rank_single(seq, args.repeats)]
            saved, step = max(r["saved"] for r in result), result[0]["step"]
            if cp == 1:
                base[seq] = (saved, step)
            block = BATCH * HEADS * (seq // (2 * cp if cp > 1 else 1)) ** 2 * 4 / MIB
            longest = int(args.budget_mib * MIB / (saved / seq)) // (2 * cp) * (2 * cp)
            ratio = f"{saved / base[seq][0]:.3f}" if seq in base else "-"
            tratio = f"{step / base[seq][1]:.2f}" if seq in base else "-"
            print(f"| {seq} | {cp} | {saved / MIB:.2f} | {ratio} | {1 / cp:.3f} | {block:.0f} | {step:.2f} | "
                  f"{tratio} | {longest} |", flush=True)


def _one_rank_single(seq: int, repeats: int) -> dict[str, float]:
    ps.destroy_model_parallel()
    try:
        return _one_rank(seq, 1, repeats)
    finally:
        ps.destroy_model_parallel()


if __name__ == "__main__":
    main()
