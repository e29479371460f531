"""MoE benchmark: one training step of our Mixtral-shaped GPT vs Hugging Face MixtralForCausalLM, and
the token-dispatch cost at EP=2 vs EP=1.

CPU time per step is reported next to wall time: it is far less sensitive to other processes sharing
the cores than wall time.

Part 1 (one process): both models have the same shape and weights (ours is built with the local
Mixtral spec and loads ``from_hf(hf).state_dict()``), fp32 on CPU, steps interleaved so machine noise
hits both alike; one step = forward, backward, AdamW. Ours runs with ``GroupedMLP`` experts
(``torch._grouped_mm``) and with ``SequentialMLP``; Hugging Face with its default experts
implementation (reported) and, where transformers offers it, ``grouped_mm``.

Part 2 (2 gloo processes, same global batch): a training step of our model at EP=1 (experts
replicated, DP=2) and at EP=2 (4 experts per rank), with the time spent in the token dispatcher
(permute + all-to-all / all-gather and back) measured around its two calls.

    .venv/bin/python bench/moe.py                 # both parts
    .venv/bin/python bench/moe.py --skip-ep
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core.interop import from_hf  # noqa: E402

SHAPE = dict(layers=2, hidden=256, heads=8, kv_heads=4, experts=8, topk=2, ffn=512, vocab=1024, batch=4, seq=256)


def _hf_model(experts_impl: str | None) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    s = SHAPE
    config = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           num_key_value_heads=s["kv_heads"], num_local_experts=s["experts"],
                           num_experts_per_tok=s["topk"], max_position_embeddings=s["seq"],
                           bos_token_id=0, eos_token_id=0, pad_token_id=None)
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if experts_impl is not None:
        kwargs["experts_implementation"] = experts_impl
    return MixtralForCausalLM._from_config(config, **kwargs).train()


def _ours_like(hf: torch.nn.Module, grouped: bool, **config_overrides: Any) -> torch.nn.Module:
    from megatron_core.models.gpt import GPTModel
    from specs.mixtral import get_mixtral_layer_local_spec

    reference = from_hf(hf)
    config = reference.config.model_copy(update=config_overrides)
    model = GPTModel(config, get_mixtral_layer_local_spec(moe_grouped_gemm=grouped), vocab_size=SHAPE["vocab"],
                     max_sequence_length=SHAPE["seq"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=False, rotary_base=reference.rotary_base)
    model.load_state_dict(reference.state_dict())
    return model.train()


def _step_fn(model: torch.nn.Module, hf: bool, tokens: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if hf:
            logits = model(input_ids=tokens, position_ids=positions).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        else:
            loss = model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def bench_vs_hf(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    hf_default = _hf_model(None)
    impl = getattr(hf_default.config, "_experts_implementation", None) or "eager"
    contenders: dict[str, tuple[torch.nn.Module, bool]] = {
        f"HF MixtralForCausalLM (experts: {impl})": (hf_default, True),
    }
    if impl != "grouped_mm":
        try:
            grouped_hf = _hf_model("grouped_mm")
            grouped_hf.load_state_dict(hf_default.state_dict())
            contenders["HF MixtralForCausalLM (experts: grouped_mm)"] = (grouped_hf, True)
        except (ValueError, TypeError, KeyError) as err:  # transformers without the option
            print(f"  (no HF grouped_mm experts: {err})", file=sys.stderr)
    # Dropless, no aux loss in timing (HF computes none without output_router_logits).
    contenders["ours, GroupedMLP experts"] = (_ours_like(hf_default, True, moe_aux_loss_coeff=0.0), False)
    contenders["ours, SequentialMLP experts"] = (_ours_like(hf_default, False, moe_aux_loss_coeff=0.0), False)
    tokens = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]))
    labels = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]))
    steps = {name: _step_fn(model, is_hf, tokens, labels) for name, (model, is_hf) in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    first_losses: dict[str, float] = {}
    order = list(steps)
    for i in range(args.warmup + args.steps):
        for name in order if i % 2 == 0 else reversed(order):
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = steps[name]()
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            first_losses.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
    n_tokens = SHAPE["batch"] * SHAPE["seq"]
    base = statistics.median(times[order[0]])
    base_cpu = statistics.median(cpu[order[0]])
    print(f"\nOne training step (fwd + bwd + AdamW), fp32, CPU, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.steps} after {args.warmup} warmup. Shape: {SHAPE}\n")
    print("| model | ms/step | tokens/s | tokens/s vs HF default | CPU s/step | CPU time vs HF default | "
          "first-step loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in order:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"| {name} | {med * 1e3:.0f} | {n_tokens / med:.0f} | {base / med:.2f}x | {med_cpu:.2f} | "
              f"{base_cpu / med_cpu:.2f}x | {first_losses[name]:.5f} |")


# ----------------------------------------------------------------------------- EP=2 vs EP=1
def _ep_rank(ep: int, steps: int, warmup: int, dispatcher: str) -> dict[str, float]:
    from megatron_core import parallel_state as ps
    from megatron_core.models.gpt import GPTModel
    from megatron_core.transformer.moe import MoELayer
    from specs.mixtral import get_mixtral_layer_local_spec, mixtral_config

    torch.set_num_threads(1)
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    s = SHAPE
    torch.manual_seed(0)
    config = mixtral_config(num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                            num_query_groups=s["kv_heads"], ffn_hidden_size=s["ffn"], num_moe_experts=s["experts"],
                            expert_model_parallel_size=ep, moe_token_dispatcher_type=dispatcher)
    model = GPTModel(config, get_mixtral_layer_local_spec(moe_grouped_gemm=True), vocab_size=s["vocab"],
                     max_sequence_length=s["seq"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).train()
    spent = [0.0]
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            for name in ("token_permutation", "token_unpermutation"):
                original = getattr(layer.token_dispatcher, name)

                def timed(*a: Any, _original: Any = original) -> Any:
                    start = time.perf_counter()
                    out = _original(*a)
                    spent[0] += time.perf_counter() - start
                    return out

                setattr(layer.token_dispatcher, name, timed)
    g = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    tokens = torch.randint(0, s["vocab"], (s["batch"] // 2, s["seq"]), generator=g)  # half the batch per rank
    positions = torch.arange(s["seq"]).unsqueeze(0).expand_as(tokens)
    step_times, dispatch = [], []
    for i in range(warmup + steps):
        spent[0] = 0.0
        torch.distributed.barrier()
        start = time.perf_counter()
        model(tokens, positions, None, labels=tokens).mean().backward()  # forward dispatch (backward not timed)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            step_times.append(elapsed)
            dispatch.append(spent[0])
    return {"step": statistics.median(step_times), "dispatch": statistics.median(dispatch)}


def bench_ep(args: argparse.Namespace) -> None:
    from megatron_core.testing import run_distributed

    print("\nExpert parallelism, 2 gloo processes (1 thread each), global batch "
          f"{SHAPE['batch']} x {SHAPE['seq']}, fwd + bwd, median of {args.steps} steps\n")
    print("| dispatcher | EP | experts / rank | step ms | forward dispatch ms (2 layers) | dispatch share |")
    print("|---|---:|---:|---:|---:|---:|")
    for dispatcher in ("alltoall", "allgather"):
        for ep in (1, 2):
            r = run_distributed(_ep_rank, 2, ep, args.steps, args.warmup, dispatcher, timeout=900)
            step = max(x["step"] for x in r)
            disp = max(x["dispatch"] for x in r)
            print(f"| {dispatcher} | {ep} | {SHAPE['experts'] // ep} | {step * 1e3:.0f} | {disp * 1e3:.1f} | "
                  f"{disp / step:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on shared machines)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-ep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_vs_hf(args)
    if not args.skip_ep:
        bench_ep(args)


if __name__ == "__main__":
    main()
