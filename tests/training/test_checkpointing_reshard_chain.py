"""Distributed-optimizer checkpoints through a chain of layouts: (TP, PP, DP) = (2, 1, 2) -> (1, 2, 1) -> (1, 1, 4).

Each leg loads the previous leg's checkpoint (model, AdamW moments gathered per parameter, step)
into a model built from other weights, trains two steps and saves; together the legs must give
the loss curve of one uninterrupted single-process run (plain AdamW). A moment lost or misplaced
in any reshard changes the next updates, and so the losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_core.distributed import unwrap_model
from megatron_core.testing import run_distributed
from megatron_core.training import load_checkpoint, save_checkpoint
from tests.models.gpt_harness import (
    full_weights,
    make_steps,
    reference,
    setup_distributed_optimizer,
    train_steps,
)

FULL = full_weights(seed=0)
OTHER = full_weights(seed=7)  # what resumed legs are built with: the load must replace all of it
STEPS = make_steps(6, seed=3)
PER_LEG = 2
TOL = 1e-6  # as the other reshard tests: TP=2 sums some products in another order


def _leg(tp: int, pp: int, leg: int, path: str) -> list[float]:
    """Train steps ``[2 * leg, 2 * leg + 2)`` at (tp, pp, world / (tp * pp)), resuming from the last leg."""
    model, optimizer = setup_distributed_optimizer(tp, pp, FULL if leg == 0 else OTHER)
    stage = unwrap_model(model)
    if leg > 0:
        common = load_checkpoint(Path(path) / f"iter_{leg * PER_LEG:07d}", stage, optimizer, load_rng=False)
        assert common["iteration"] == leg * PER_LEG and common["optimizer"]["step"] == leg * PER_LEG
    losses = train_steps(model, optimizer, STEPS[leg * PER_LEG:(leg + 1) * PER_LEG], 2)[0]
    save_checkpoint(path, (leg + 1) * PER_LEG, unwrap_model(model), optimizer)
    return losses


@pytest.mark.slow  # ~30 s: three spawns of 4, 2 and 4 processes
def test_distributed_optimizer_reshards_tp2_dp2_to_pp2_to_dp4(tmp_path):
    path = str(tmp_path / "ckpt")
    uninterrupted = reference(FULL, STEPS)[0]
    chain = [(4, 2, 1), (2, 1, 2), (4, 1, 1)]  # (world, tp, pp): DP = 2, 1, 4
    for leg, (world, tp, pp) in enumerate(chain):
        for losses in run_distributed(_leg, world, tp, pp, leg, path, tmp_dir=tmp_path):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(uninterrupted[leg * PER_LEG:][:PER_LEG]),
                                       atol=TOL, rtol=0, msg=lambda m, leg=leg: f"leg {leg} (world, TP, PP)={chain[leg]}: {m}")
