"""``make demo``: a GPT built from a spec, trained at TP=2 on torchrun, reloaded at TP=1, generating.

Steps (everything on CPU, nothing downloaded; outputs in ``demo_out/``):

1. train the GPT of ``examples/alphabet_gpt.yaml`` (local spec) with ``torchrun --nproc_per_node 2``
   at tensor-parallel size 2 over gloo, saving a sharded checkpoint;
2. in this single process, load that checkpoint at tensor-parallel size 1;
3. score next-letter accuracy on held-out sequences (must be >= 99%);
4. generate the 12 letters after "h" with the key/value cache (and check uncached decoding agrees);
5. draw the loss curve to ``demo_out/loss_curve.png``.

Exits non-zero when training, reloading or the accuracy check fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_core import cli, parallel_state
from megatron_core.data import AlphabetDataset, AlphabetTokenizer, collate
from megatron_core.dist_checkpointing import read_metadata
from megatron_core.inference import generate
from megatron_core.training.run_config import RunConfig, build_spec, model_from_checkpoint
from megatron_core.transformer.spec_utils import format_spec

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "alphabet_gpt.yaml"
OUT = Path("demo_out")
REQUIRED_ACCURACY = 0.99
PROMPT, NUM_NEW = "h", 12


def _overrides(out: Path) -> list[str]:
    return [
        "parallel.tensor_model_parallel_size=2",
        f"training.save_dir={out / 'checkpoints'}",
        f"training.metrics_file={out / 'metrics.jsonl'}",
        "training.resume=false",
        "training.device=cpu",  # the CPU demo everywhere: gloo, even where a GPU is present
    ]


def train_with_torchrun(out: Path) -> None:
    """Step 1: two processes, TP=2, gloo; raises CalledProcessError when training fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megatron_core.train", "--config", str(CONFIG)]
    for item in _overrides(out):
        cmd += ["--set", item]
    print("$ torchrun --nproc_per_node 2 -m megatron_core.train --config examples/alphabet_gpt.yaml "
          + " ".join(f"--set {o}" for o in _overrides(out)), flush=True)
    subprocess.run(cmd, check=True, cwd=Path.cwd())


def next_letter_accuracy(model: torch.nn.Module, tokenizer: AlphabetTokenizer, seq_length: int,
                         num_sequences: int = 512) -> float:
    """Greedy next-token accuracy on the predictable targets of held-out alphabet sequences."""
    held_out = AlphabetDataset(num_sequences, seq_length, seed=10_007)  # a seed training never uses
    batch = collate([held_out[i] for i in range(num_sequences)])
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)[..., :tokenizer.num_real_tokens]
    mask = batch["loss_mask"].bool()
    correct = (logits.argmax(-1) == batch["labels"]) & mask
    return float(correct.sum() / mask.sum())


def describe_checkpoint(checkpoint: Path, key: str = "decoder.layers.0.mlp.linear_fc1.weight") -> str:
    """One line on what was saved, and how one TP-split weight was cut into shards."""
    meta = read_metadata(checkpoint)
    record = meta.tensors[key]
    shards = ", ".join(f"rank {s.rank} rows {s.offset[0]}-{s.offset[0] + s.shape[0] - 1}" for s in record.shards)
    num_model = sum(not k.startswith("optimizer.") for k in meta.tensors)
    return (f"{checkpoint}: {num_model} model tensors + {len(meta.tensors) - num_model} AdamW moments, "
            f"saved by {meta.world_size} ranks\n  e.g. {key} {list(record.global_shape)}: {shards}")


def plot_loss(metrics_file: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*train, strict=True), label="train", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation")
    ax.set(xlabel="iteration", ylabel="loss (nats / token)", yscale="log",
           title="Alphabet GPT, trained at TP=2 (2 processes, gloo)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    cli.ArgumentParser(prog="python -m megatron_core.demo", description=__doc__.splitlines()[0]).parse_args(argv)
    start = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    # A fresh run each time: old checkpoints would be resumed, old metrics would be plotted.
    shutil.rmtree(OUT / "checkpoints", ignore_errors=True)
    (OUT / "metrics.jsonl").unlink(missing_ok=True)
    run = RunConfig.from_yaml(CONFIG, _overrides(OUT))
    print("Layer spec (specs.gpt.get_gpt_layer_local_spec):\n" + format_spec(build_spec(run)), flush=True)

    print("\n[1/5] training at tensor-parallel size 2 ...", flush=True)
    try:
        train_with_torchrun(OUT)
    except subprocess.CalledProcessError as err:
        print(f"FAIL: training exited with status {err.returncode} (its output is above)", file=sys.stderr)
        return 1
    train_seconds = time.perf_counter() - start

    print("\n[2/5] reloading the TP=2 checkpoint at tensor-parallel size 1 ...", flush=True)
    parallel_state.initialize_model_parallel(1)
    try:
        model, _, checkpoint, common = model_from_checkpoint(OUT / "checkpoints")
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        print(f"FAIL: reloading the checkpoint at TP=1: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(describe_checkpoint(checkpoint))
    print(f"loaded it (saved at TP={common['tensor_model_parallel_size']}, iteration "
          f"{common['iteration']}) into a TP=1 model", flush=True)

    tokenizer = AlphabetTokenizer()
    accuracy = next_letter_accuracy(model, tokenizer, run.data.seq_length)
    print(f"\n[3/5] next-letter accuracy on 512 held-out sequences: {accuracy:.2%}", flush=True)

    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(PROMPT)]])
    cached = generate(model, prompt, NUM_NEW, use_cache=True, vocab_size=tokenizer.num_real_tokens)
    uncached = generate(model, prompt, NUM_NEW, use_cache=False, vocab_size=tokenizer.num_real_tokens)
    letters = tokenizer.decode(cached.new_tokens(prompt.size(1))[0])
    same = torch.equal(cached.tokens, uncached.tokens)
    max_diff = float((cached.logits - uncached.logits).abs().max())
    print(f"[4/5] generation with KV cache: {PROMPT!r} -> {letters!r} "
          f"(uncached decoding {'agrees' if same else 'DIFFERS'}, max logit diff {max_diff:.1e})", flush=True)

    png = plot_loss(OUT / "metrics.jsonl", OUT / "loss_curve.png")
    print(f"[5/5] loss curve: {png.resolve()}")
    print(f"wall time: {time.perf_counter() - start:.0f} s (training {train_seconds:.0f} s)")
    if accuracy < REQUIRED_ACCURACY:
        print(f"FAIL: accuracy {accuracy:.2%} < {REQUIRED_ACCURACY:.0%}", file=sys.stderr)
        return 1
    if not same:
        print("FAIL: cached and uncached generation differ", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    cli.run(main)
