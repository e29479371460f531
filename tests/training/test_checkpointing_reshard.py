"""Model + AdamW saved at one (TP, PP, DP) resume at another and continue exactly as if uninterrupted.

The save goes through the training loop's checkpointing (``training.save_checkpoint``), so the
resume path users get is the one tested: layer keys by global index, the last stage's tied
embedding stored as a copy of the first stage's, AdamW moments keyed by parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_core import dist_checkpointing
from megatron_core import parallel_state as ps
from megatron_core.distributed import (
    unwrap_model,
)
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.testing import run_distributed
from megatron_core.training import load_checkpoint, save_checkpoint
from tests.models.gpt_harness import (
    full_weights,
    make_steps,
    setup,
    setup_distributed_optimizer,
    train_steps,
)

FULL = full_weights(seed=0)
OTHER = full_weights(seed=7)  # what resumed runs are built with: the load must replace all of it
STEPS = make_steps(4, seed=3)
SAVED_AT = 2
TOL = 1e-6


def _save_then_continue(path: str) -> list[float]:
    """At (TP, PP, DP) = (2, 2, 1): two steps, save, two more steps (the uninterrupted run)."""
    model, optimizer = setup(2, 2, FULL)
    train_steps(model, optimizer, STEPS[:SAVED_AT], 4)
    save_checkpoint(path, SAVED_AT, unwrap_model(model), optimizer)
    return train_steps(model, optimizer, STEPS[SAVED_AT:], 4)[0]


def _resume(tp: int, pp: int, num_microbatches: int, path: str) -> list[float]:
    model, optimizer = setup(tp, pp, OTHER)
    common = load_checkpoint(Path(path) / f"iter_{SAVED_AT:07d}", unwrap_model(model), optimizer)
    assert common["iteration"] == SAVED_AT
    return train_steps(model, optimizer, STEPS[SAVED_AT:], num_microbatches)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[float]]:
    path = tmp_path_factory.mktemp("reshard") / "ckpt"
    uninterrupted = run_distributed(_save_then_continue, 4, str(path), tmp_dir=path.parent)[0]
    return str(path), uninterrupted


@pytest.mark.parametrize("world, tp, pp, num_microbatches", [
    pytest.param(1, 1, 1, 2, id="to-tp1-pp1-dp1"),
    pytest.param(4, 1, 4, 4, id="to-tp1-pp4-dp1"),
    pytest.param(4, 2, 1, 2, id="to-tp2-pp1-dp2"),
])
def test_resume_at_another_layout_continues_the_same_loss_curve(saved, tmp_path, world, tp, pp, num_microbatches):
    path, uninterrupted = saved
    for losses in run_distributed(_resume, world, tp, pp, num_microbatches, path, tmp_dir=tmp_path):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(uninterrupted), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- distributed optimizer
def _zero_save(model: torch.nn.Module, optimizer: DistributedOptimizer, path: str) -> None:
    inner = unwrap_model(model)
    model_sd = inner.sharded_state_dict()  # type: ignore[operator]
    sharded = {**model_sd, **optimizer.sharded_state_dict(inner, model_sd)}
    dist_checkpointing.save(sharded, path, common_state_dict={"iteration": SAVED_AT,
                                                             "optimizer": optimizer.common_state()})


def _zero_load(model: torch.nn.Module, optimizer: DistributedOptimizer, path: str) -> None:
    inner = unwrap_model(model)
    model_sd = inner.sharded_state_dict()  # type: ignore[operator]
    loaded = dist_checkpointing.load({**model_sd, **optimizer.sharded_state_dict(inner, model_sd)}, path)
    state = inner.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in model_sd:
            state[key].copy_(loaded[key])
    optimizer.load_sharded_state_dict(inner, model_sd, loaded, dist_checkpointing.load_common_state_dict(path)["optimizer"])


def _zero_save_then_continue(path: str) -> dict[str, Any]:
    """Distributed optimizer at (1, 2, 2): state split over the two DP ranks of each stage."""
    model, optimizer = setup_distributed_optimizer(1, 2, FULL)
    train_steps(model, optimizer, STEPS[:SAVED_AT], 2)
    owned = optimizer.state_bytes()
    total = 8 * sum(p.numel() for p in unwrap_model(model).parameters())  # two fp32 moments
    _zero_save(model, optimizer, path)
    losses = train_steps(model, optimizer, STEPS[SAVED_AT:], 2)[0]
    return {"losses": losses, "owned": owned, "total": total, "stage": ps.get_pipeline_model_parallel_rank()}


def _zero_resume(tp: int, pp: int, path: str, zero: bool) -> list[float]:
    if zero:
        model, optimizer = setup_distributed_optimizer(tp, pp, OTHER)
        _zero_load(model, optimizer, path)
    else:  # plain AdamW through the training loop's loader: same keys, any layout
        model, optimizer = setup(tp, pp, OTHER)
        load_checkpoint(path, unwrap_model(model), optimizer, load_rng=False)
    return train_steps(model, optimizer, STEPS[SAVED_AT:], 2)[0]


def test_distributed_optimizer_splits_state_and_reshards(saved, tmp_path):
    reference = saved[1]  # the uninterrupted plain-AdamW run at (2, 2, 1)
    path = str(tmp_path / "zero")
    saved = run_distributed(_zero_save_then_continue, 4, path, tmp_dir=tmp_path)
    # Same training as plain AdamW (TP2xPP2 there, PP2xDP2 + ZeRO here).
    torch.testing.assert_close(torch.tensor(saved[0]["losses"]), torch.tensor(reference), atol=TOL, rtol=0)
    for stage in (0, 1):
        ranks = [r for r in saved if r["stage"] == stage]
        assert all(0 < r["owned"] < r["total"] for r in ranks), "each DP rank holds part of the state"
        assert ranks[0]["total"] <= sum(r["owned"] for r in ranks) < 1.01 * ranks[0]["total"], "together all of it"
    for world, tp, pp, zero in [(4, 1, 1, True), (1, 1, 1, False)]:
        for losses in run_distributed(_zero_resume, world, tp, pp, path, zero, tmp_dir=tmp_path):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=TOL, rtol=0)
