"""Plug your own module into a GPT by spec, train it at TP=2, reload it at TP=1.

    python examples/custom_layer_spec.py [--out runs/custom_layer_spec] [--iters 30]

(it launches itself on two processes with torchrun for the TP=2 part).

What it shows:

1. ``GatedMLP`` below is a user-written module (a SwiGLU MLP with separate gate/up projections):
   it only declares its slots and wires them; the tensor-parallel linears come from the spec.
   Swapping it into the stock GPT layer spec is one line: ``spec.submodules.mlp = ...``.
2. Its sharded checkpoint layout comes for free: the default ``sharded_state_dict`` walks the
   children, and each parallel linear says how it is split. So a run saved at TP=2 loads at TP=1
   and gives the same logits.
3. A module that does not fit a slot's Protocol (here ``torch.nn.Linear`` in ``gate_proj``) fails
   when the model is *built*, with a ``SpecError`` naming the slot, not deep inside ``forward``.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset, AlphabetTokenizer, collate
from megatron_core.inference import gather_vocab_logits
from megatron_core.models.gpt import GPTModel
from megatron_core.module import MegatronModule
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, model_parallel_manual_seed
from megatron_core.training import Trainer, TrainingSettings, latest_checkpoint, load_model
from megatron_core.transformer.mlp import LinearFc1Builder, LinearFc2Builder
from megatron_core.transformer.spec_utils import ModuleSpec, SpecError, build_module, format_spec
from specs.gpt import get_gpt_layer_local_spec


# ----------------------------------------------------------------------------- the user's module
@dataclass
class GatedMLPSubmodules:
    """Slots typed with the builder Protocols: the spec system checks what fills them at build time."""

    gate_proj: ModuleSpec | type | LinearFc1Builder
    up_proj: ModuleSpec | type | LinearFc1Builder
    down_proj: ModuleSpec | type | LinearFc2Builder


class GatedMLP(MegatronModule):
    """``down(silu(gate(x)) * up(x))``; gate and up are split over TP by output, down by input."""

    def __init__(self, config: TransformerConfig, submodules: GatedMLPSubmodules) -> None:
        super().__init__(config)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        column = dict(config=config, init_method=config.init_method, gather_output=False, bias=False,
                      skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group)
        self.gate_proj = build_module(submodules.gate_proj, config.hidden_size, config.ffn_hidden_size, **column)
        self.up_proj = build_module(submodules.up_proj, config.hidden_size, config.ffn_hidden_size, **column)
        self.down_proj = build_module(
            submodules.down_proj, config.ffn_hidden_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group,
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate, _ = self.gate_proj(hidden_states)  # [s, b, h] -> [s, b, ffn/tp]
        up, _ = self.up_proj(hidden_states)  # [s, b, h] -> [s, b, ffn/tp]
        return self.down_proj(F.silu(gate) * up)  # [s, b, ffn/tp] -> ([s, b, h], None)


def gated_mlp_gpt_spec(gate_proj: Any = ColumnParallelLinear) -> ModuleSpec:
    """The stock local GPT layer with its MLP slot replaced by ``GatedMLP``."""
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.mlp = ModuleSpec(
        module=GatedMLP,
        submodules=GatedMLPSubmodules(gate_proj=gate_proj, up_proj=ColumnParallelLinear, down_proj=RowParallelLinear),
    )
    return spec


# ----------------------------------------------------------------------------- train, save, reload
SEQ = 16
TOKENIZER = AlphabetTokenizer()


def make_model(tp: int, gate_proj: Any = ColumnParallelLinear) -> GPTModel:
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp)
    return GPTModel(config, gated_mlp_gpt_spec(gate_proj), vocab_size=TOKENIZER.vocab_size, max_sequence_length=SEQ)


def full_logits(model: GPTModel) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` (gathered over TP) on a fixed probe batch."""
    ds = AlphabetDataset(4, SEQ, seed=99)
    batch = collate([ds[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        return gather_vocab_logits(model(batch["tokens"], batch["position_ids"], None))


def train_tp2(out: Path, iters: int) -> None:
    """Runs on each rank under torchrun: TP=2, a few updates, a sharded checkpoint."""
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_manual_seed(0)
    model = make_model(tp=2)
    settings = TrainingSettings(train_iters=iters, micro_batch_size=16, lr=3e-3, min_lr=3e-4, warmup_iters=2,
                                save_dir=str(out), resume=False, progress_bar=False)
    result = Trainer(model, settings, AlphabetDataset(10_000, SEQ, seed=0)).train()
    logits = full_logits(model)
    if dist.get_rank() == 0:
        torch.save({"losses": result.losses, "logits": logits}, out / "tp2_result.pt")
    dist.destroy_process_group()


def main(out: Path, iters: int) -> float:
    """Returns the max |logit difference| between the TP=2 model and its TP=1 reload."""
    print("Layer spec with the user's GatedMLP in the mlp slot:\n" + format_spec(gated_mlp_gpt_spec()), flush=True)

    # 1. Train at TP=2: this same file, two processes under torchrun.
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, "--out", str(out), "--iters", str(iters), "--train-tp2"], check=True)
    tp2 = torch.load(out / "tp2_result.pt", weights_only=True)
    losses = tp2["losses"]
    print(f"\ntrained {iters} updates at TP=2: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 2. Reload the TP=2 checkpoint into a TP=1 model: same logits.
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise SystemExit(f"FAIL: no complete checkpoint in {out}")
    model = make_model(tp=1)
    load_model(checkpoint, model)
    diff = float((full_logits(model) - tp2["logits"]).abs().max())
    print(f"reloaded {checkpoint} at TP=1: max |logit difference| vs TP=2 = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"FAIL: the TP=1 reload differs from the TP=2 model by {diff}")

    # 3. A module that does not fit the slot's Protocol fails when the model is built.
    try:
        make_model(tp=1, gate_proj=torch.nn.Linear)
    except SpecError as err:
        print(f"\nnn.Linear in the gate_proj slot fails at build time, as it should:\n  SpecError: {err}")
    else:
        raise SystemExit("FAIL: a module that does not fit LinearFc1Builder was accepted")
    return diff


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/custom_layer_spec"), help="checkpoint directory")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--train-tp2", action="store_true", help=argparse.SUPPRESS)  # the torchrun workers
    args = parser.parse_args()
    if args.train_tp2:
        train_tp2(args.out, args.iters)
    else:
        main(args.out, args.iters)
