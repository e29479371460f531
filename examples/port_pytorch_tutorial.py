"""Port the PyTorch tutorial's transformer language model to megatron_core by changing its imports.

The model below is the one from PyTorch's "Language Modeling with nn.Transformer" tutorial
(``nn.Embedding`` + sinusoidal ``PositionalEncoding`` + ``nn.TransformerEncoder`` + ``nn.Linear``),
batch-first, trained on the alphabet task (after ``h`` comes ``i``). This script runs it three ways:

1. as written, on ``torch.nn``, in one process;
2. with only its imports changed (``import megatron_core.nn as nn`` and ``TransformerEncoder`` /
   ``TransformerEncoderLayer`` from ``megatron_core.nn``), on two processes under torchrun at
   tensor-parallel size 2 (attention heads and feed-forward split across them), then saved as a
   sharded checkpoint with ``megatron_core.dist_checkpointing``;
3. the ported model rebuilt at TP=1, the TP=2 checkpoint loaded into it: same accuracy.

Run: ``python examples/port_pytorch_tutorial.py`` (about half a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

PORTED = os.environ.get("PORT_TUTORIAL_PORTED") == "1"

# ----------------------------------------------------------------------------- the only change
if PORTED:
    import megatron_core.nn as nn  # was: import torch.nn as nn
    from megatron_core.nn import TransformerEncoder, TransformerEncoderLayer  # was: from torch.nn import ...
else:
    import torch.nn as nn
    from torch.nn import TransformerEncoder, TransformerEncoderLayer


# ----------------------------------------------------------------------------- the tutorial's model, unchanged
class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions added to the (batch-first) token embeddings."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[: x.size(1)])  # x: [batch, seq, d_model]


class TransformerModel(nn.Module):
    """Embedding -> positions -> TransformerEncoder (causal) -> linear head over the vocabulary."""

    def __init__(self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int, dropout: float = 0.5):
        super().__init__()
        self.pos_encoder = PositionalEncoding(d_model, dropout)
        encoder_layers = TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
        self.transformer_encoder = TransformerEncoder(encoder_layers, nlayers)
        self.embedding = nn.Embedding(ntoken, d_model)
        self.d_model = d_model
        self.linear = nn.Linear(d_model, ntoken)
        self.init_weights()

    def init_weights(self) -> None:
        initrange = 0.1
        self.embedding.weight.data.uniform_(-initrange, initrange)
        self.linear.bias.data.zero_()
        self.linear.weight.data.uniform_(-initrange, initrange)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        src = self.embedding(src) * math.sqrt(self.d_model)
        src = self.pos_encoder(src)
        output = self.transformer_encoder(src, src_mask)
        return self.linear(output)


# ----------------------------------------------------------------------------- training and scoring
SEQ, BATCH, SEED = 16, 32, 0


def make_model(vocab: int) -> TransformerModel:
    torch.manual_seed(SEED)
    return TransformerModel(vocab, d_model=64, nhead=4, d_hid=128, nlayers=2, dropout=0.1)


def batches(num: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from megatron_core.data.alphabet import AlphabetDataset

    data = AlphabetDataset(num * BATCH, SEQ, seed=seed)
    samples = [data[i] for i in range(len(data))]
    out = []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        tokens = torch.stack([s["tokens"] for s in chunk])
        labels = torch.stack([s["labels"] for s in chunk])
        keep = torch.stack([s["loss_mask"] for s in chunk]).bool()
        out.append({"tokens": tokens, "labels": labels.masked_fill(~keep, -100)})  # -100: not scored
    return out


def train_and_score(model: TransformerModel, steps: int) -> tuple[list[float], float]:
    causal = torch.nn.Transformer.generate_square_subsequent_mask(SEQ)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=-100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for batch in batches(steps, seed=1):
        logits = model(batch["tokens"], causal)  # [b, s, vocab]
        loss = criterion(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, accuracy(model)


@torch.no_grad()
def accuracy(model: TransformerModel) -> float:
    causal = torch.nn.Transformer.generate_square_subsequent_mask(SEQ)
    model.eval()
    hits = total = 0
    for batch in batches(4, seed=2):
        predicted = model(batch["tokens"], causal).argmax(-1)
        scored = batch["labels"] != -100
        hits += int((predicted[scored] == batch["labels"][scored]).sum())
        total += int(scored.sum())
    return hits / total


def vocab_size() -> int:
    from megatron_core.data.alphabet import AlphabetTokenizer

    return AlphabetTokenizer().vocab_size


# ----------------------------------------------------------------------------- the three stages
def stage_torch(out: Path, steps: int) -> None:
    losses, acc = train_and_score(make_model(vocab_size()), steps)
    (out / "torch.json").write_text(json.dumps({"losses": losses, "accuracy": acc}))


def stage_ported_tp2(out: Path, steps: int) -> None:
    """One rank of the torchrun job: ported model at TP=2, trained, scored and saved."""
    import torch.distributed as dist

    from megatron_core import dist_checkpointing, parallel_state
    from megatron_core.module import default_sharded_state_dict
    from megatron_core.tensor_parallel import model_parallel_manual_seed

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_manual_seed(SEED)  # dropout on split activations draws from a per-rank stream
    model = make_model(vocab_size())
    heads = model.transformer_encoder.layers[0].self_attention.num_attention_heads_per_partition
    losses, acc = train_and_score(model, steps)
    dist_checkpointing.save(default_sharded_state_dict(model), out / "checkpoint", overwrite=True)
    if dist.get_rank() == 0:
        (out / "ported_tp2.json").write_text(json.dumps({"losses": losses, "accuracy": acc, "heads_per_rank": heads}))
    dist.destroy_process_group()


def stage_ported_tp1(out: Path) -> None:
    """The ported model at TP=1 (one process), loaded from the TP=2 checkpoint and scored."""
    from megatron_core import dist_checkpointing
    from megatron_core.module import default_sharded_state_dict

    model = make_model(vocab_size())
    model.load_state_dict(dist_checkpointing.load(default_sharded_state_dict(model), out / "checkpoint"))
    (out / "ported_tp1.json").write_text(json.dumps({"accuracy": accuracy(model)}))


def run_stage(stage: str, out: Path, steps: int, ported: bool, nproc: int = 1) -> dict:
    env = {**os.environ, "PORT_TUTORIAL_PORTED": "1" if ported else "0", "GLOO_SOCKET_IFNAME": "lo"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    subprocess.run([*launcher, __file__, "--stage", stage, "--out", str(out), "--steps", str(steps)],
                   check=True, env=env)
    return json.loads((out / f"{stage.replace('-', '_')}.json").read_text())


def main(out: Path, steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    reference = run_stage("torch", out, steps, ported=False)
    print(f"1. torch.nn model, 1 process:        loss {reference['losses'][0]:.3f} -> {reference['losses'][-1]:.3f}, "
          f"accuracy {reference['accuracy']:.1%}", flush=True)
    ported = run_stage("ported-tp2", out, steps, ported=True, nproc=2)
    print(f"2. imports changed, TP=2 (torchrun): loss {ported['losses'][0]:.3f} -> {ported['losses'][-1]:.3f}, "
          f"accuracy {ported['accuracy']:.1%} ({ported['heads_per_rank']} of 4 heads per rank); "
          f"saved {out / 'checkpoint'}", flush=True)
    reloaded = run_stage("ported-tp1", out, steps, ported=True)
    print(f"3. TP=2 checkpoint loaded at TP=1:   accuracy {reloaded['accuracy']:.1%}", flush=True)
    if reloaded["accuracy"] != ported["accuracy"]:
        raise SystemExit(f"FAIL: accuracy {reloaded['accuracy']} after reloading at TP=1, {ported['accuracy']} at TP=2")
    print("same accuracy after resharding TP=2 -> TP=1")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/port_pytorch_tutorial"))
    parser.add_argument("--steps", type=int, default=80, help="training steps (batches of 32)")
    parser.add_argument("--stage", choices=["torch", "ported-tp2", "ported-tp1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "torch":
        stage_torch(args.out, args.steps)
    elif args.stage == "ported-tp2":
        stage_ported_tp2(args.out, args.steps)
    elif args.stage == "ported-tp1":
        stage_ported_tp1(args.out)
    else:
        main(args.out, args.steps)
