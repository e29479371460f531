"""One training step (forward, backward, AdamW) of a ~1.3B GPT in bf16 on one GPU: TE spec vs local spec.

Both models are built from the same config and seed (so the same weights: the TE wrappers share
the local layers' TP-invariant initialisation), one after the other on the same GPU; each runs
warm-up steps, then timed steps between CUDA synchronisations. Reported per spec: median step
time, tokens/s, model FLOPs utilisation (MFU), the first step's loss (the two should agree to bf16
precision), and the TE/local throughput ratio.

Model FLOPs per step (Narayanan et al. 2021, no recompute, full attention matrix counted):
``72 * B * s * L * h^2 * (1 + s / (6 h) + V / (12 L h))``; MFU divides by the GPU's dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s; override with ``--peak-tflops``).

    python bench/te_vs_local.py                          # GPT 1.3B: 24L, h2048, 16 heads, s2048, b4
    python bench/te_vs_local.py --shape 350m --steps 10  # a smaller GPT
    python bench/te_vs_local.py --json out.json          # also write the figures as JSON
    python bench/te_vs_local.py --fp8 hybrid --fp8-recipe delayed --compile   # + TE FP8 and local+compile rows

``--fp8 FORMAT`` adds a row for the TE spec training in FP8 (``TransformerConfig.fp8`` /
``fp8_recipe``; the forward inside ``fp8_autocast`` through ``megatron_core.extensions.te_fp8``, as the
Trainer does); ``--compile`` adds the local spec with every ``TransformerLayer`` under
``torch.compile`` (the first steps, compilation included, are warm-up). MFU is always counted
against the bf16 peak.

Needs a CUDA GPU and Transformer Engine (``pip install 'spec-megatron[te]'``); exits with a
message saying what is missing otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_core.config import TransformerConfig  # noqa: E402
from megatron_core.extensions.te_fp8 import check_fp8_support, fp8_context  # noqa: E402
from megatron_core.extensions.te_usability import TEUnavailableError, require_te, te_version  # noqa: E402
from megatron_core.models.gpt import GPTModel  # noqa: E402
from megatron_core.training.compile import compile_layers  # noqa: E402
from specs.backends import Backend, get_gpt_layer_spec  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int = 50304


SHAPES = {
    "1.3b": Shape("GPT 1.3B", 24, 2048, 16, 2048),
    "350m": Shape("GPT 350M", 24, 1024, 16, 2048),
    "125m": Shape("GPT 125M", 12, 768, 12, 2048),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class Variant:
    """One row: a spec, optionally in FP8 (TE only) or with its layers compiled."""

    name: str
    backend: Backend
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    compile: bool = False


@dataclass
class Result:
    spec: str
    params: int
    step_ms_median: float
    tokens_per_s: float
    mfu: float
    first_loss: float
    peak_memory_gib: float


def model_flops_per_step(shape: Shape, batch: int) -> float:
    """Training FLOPs of one step (forward + backward), Megatron's formula."""
    s, h, layers, vocab = shape.seq, shape.hidden, shape.layers, shape.vocab
    return 72.0 * batch * s * layers * h * h * (1 + s / (6 * h) + vocab / (12 * layers * h))


def peak_tflops(override: float | None) -> float:
    if override is not None:
        return override
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass its dense bf16 peak with --peak-tflops")


def build_config(shape: Shape, variant: Variant) -> TransformerConfig:
    return TransformerConfig.model_validate({
        "num_layers": shape.layers, "hidden_size": shape.hidden, "num_attention_heads": shape.heads,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "params_dtype": "bfloat16", "bf16": True,
        "fp8": variant.fp8, "fp8_recipe": variant.fp8_recipe,
    })


def build(shape: Shape, variant: Variant) -> GPTModel:
    config = build_config(shape, variant)
    torch.manual_seed(1234)
    model = GPTModel(config, get_gpt_layer_spec(backend=variant.backend), vocab_size=shape.vocab,
                     max_sequence_length=shape.seq)
    if variant.compile:
        compile_layers(model)
    return model.cuda().train()


def run(shape: Shape, variant: Variant, batch: int, warmup: int, steps: int, peak: float) -> Result:
    model = build(shape, variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, shape.vocab, (batch, shape.seq), device="cuda", generator=generator)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(shape.seq, device="cuda").expand(batch, shape.seq)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with fp8_context(model.config):  # forward only, as the Trainer does; a no-op without fp8
            loss = model(tokens, positions, None, labels=labels).float().mean()  # per-token loss [b, s]
        loss.backward()
        optimizer.step()
        return loss.detach()

    torch.cuda.reset_peak_memory_stats()
    first_loss = step().item()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    step_ms = statistics.median(times)
    result = Result(
        spec=variant.name,
        params=sum(p.numel() for p in model.parameters()),
        step_ms_median=step_ms,
        tokens_per_s=batch * shape.seq / (step_ms / 1e3),
        mfu=model_flops_per_step(shape, batch) / (step_ms / 1e3) / (peak * 1e12),
        first_loss=first_loss,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    return result


def run_and_free(shape: Shape, variant: Variant, batch: int, warmup: int, steps: int, peak: float) -> Result:
    """``run``, then give the model's memory back before the next spec is built."""
    result = run(shape, variant, batch, warmup, steps, peak)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (micro-batch)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None, help="add a TE row in FP8")
    parser.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    parser.add_argument("--compile", action="store_true", help="add a row: local spec, layers torch.compile'd")
    args = parser.parse_args()
    try:
        require_te("bench/te_vs_local.py")
    except TEUnavailableError as err:
        raise SystemExit(f"{err}\nThis benchmark compares TE with the local kernels, so it needs both.") from None

    shape = SHAPES[args.shape]
    peak = peak_tflops(args.peak_tflops)
    print(f"{shape.name}: {shape.layers}L h{shape.hidden} {shape.heads} heads s{shape.seq} V{shape.vocab}, "
          f"batch {args.batch}, bf16, AdamW; {torch.cuda.get_device_name()} (peak {peak:.0f} TFLOP/s), "
          f"torch {torch.__version__}, TE {te_version()}")
    variants = [Variant("local", "local"), Variant("te", "te")]
    if args.compile:
        variants.append(Variant("local+compile", "local", compile=True))
    if args.fp8 is not None:
        fp8 = Variant(f"te+fp8 {args.fp8}/{args.fp8_recipe}", "te", fp8=args.fp8, fp8_recipe=args.fp8_recipe)
        check_fp8_support(build_config(shape, fp8))
        variants.append(fp8)
    results = [run_and_free(shape, v, args.batch, args.warmup, args.steps, peak) for v in variants]
    width = max(len(v.name) for v in variants)
    print(f"{'spec':{width}} {'params':>8} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'loss@1':>8} {'mem GiB':>8}")
    for r in results:
        print(f"{r.spec:{width}} {r.params / 1e9:7.3f}B {r.step_ms_median:9.1f} {r.tokens_per_s:10.0f} "
              f"{r.mfu:6.1%} {r.first_loss:8.4f} {r.peak_memory_gib:8.1f}")
    te_tps = results[1].tokens_per_s
    ratio = te_tps / results[0].tokens_per_s
    print(f"TE / local throughput: {ratio:.2f}x")
    for r in results[2:]:
        print(f"{r.spec} / TE bf16 throughput: {r.tokens_per_s / te_tps:.2f}x")
    if args.json is not None:
        payload = {"shape": asdict(shape), "batch": args.batch, "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "te": te_version(), "results": [asdict(r) for r in results],
                   "te_over_local": ratio}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
