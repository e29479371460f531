"""A bf16 run with the distributed optimizer resumes a checkpoint that holds no fp32 master weights,
and an fp32 run resumes a bf16 run's checkpoint from its fp32 masters.

The checkpoint comes from an fp32 run with plain AdamW (DP=2): it has fp32 weights and moments
but no ``fp32_param``. The bf16 run's masters must start from the checkpoint's weights read in
fp32 (exactly, not rounded through bf16), its moments must be the saved ones, its bf16 weights
the saved ones rounded, and training must continue. A checkpoint without AdamW moments cannot
resume an optimizer: that raises, naming the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_core import dist_checkpointing
from megatron_core import parallel_state as ps
from megatron_core.distributed import DistributedDataParallel, unwrap_model
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.testing import run_distributed
from megatron_core.training import load_checkpoint, save_checkpoint
from megatron_core.training.optimizer import OptimizerStateError, optimizer_sharded_state_dict
from tests.models.gpt_harness import (
    full_weights,
    make_steps,
    setup,
    setup_distributed_optimizer,
    train_steps,
)

FULL = full_weights(seed=0)
OTHER = full_weights(seed=7)
STEPS = make_steps(4, seed=3)


def _tensors(sharded: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {entry.key: entry.data.detach().float().clone() for entry in sharded.values()}


def _bf16_stage() -> tuple[torch.nn.Module, DistributedDataParallel, DistributedOptimizer]:
    model, optimizer = setup_distributed_optimizer(1, 1, OTHER, params_dtype="bfloat16")
    return unwrap_model(model), model, optimizer


def _fp32_to_bf16(path: str) -> dict[str, Any]:
    ps.initialize_model_parallel(1, 1)  # DP = 2
    model, optimizer = setup(1, 1, FULL)  # fp32 weights, plain AdamW
    train_steps(model, optimizer, STEPS[:2], 2)
    fp32 = unwrap_model(model)
    model_sd = fp32.sharded_state_dict()  # type: ignore[operator]
    saved_weights = _tensors(model_sd)
    saved_moments = _tensors(optimizer_sharded_state_dict(optimizer, fp32, model_sd))
    save_checkpoint(path, 2, fp32, optimizer)
    fp32_next = train_steps(model, optimizer, STEPS[2:], 2)[0]

    stage, bf16_model, bf16_optimizer = _bf16_stage()
    load_checkpoint(Path(path) / "iter_0000002", stage, bf16_optimizer, load_rng=False)
    state = _tensors(bf16_optimizer.sharded_state_dict(stage, stage.sharded_state_dict()))
    masters = {k.removeprefix("optimizer.state.").removesuffix(".fp32_param"): v for k, v in state.items()
               if k.endswith(".fp32_param")}
    bf16_weights = {e.key: e.data.detach().clone() for e in stage.sharded_state_dict().values()}
    bf16_next = train_steps(bf16_model, bf16_optimizer, STEPS[2:], 2)[0]

    # And back: an fp32 run resuming the bf16 run's checkpoint takes the fp32 masters as its weights.
    save_checkpoint(path, 4, stage, bf16_optimizer)
    bf16_state = _tensors(bf16_optimizer.sharded_state_dict(stage, stage.sharded_state_dict()))
    back, back_optimizer = setup(1, 1, OTHER)
    load_checkpoint(Path(path) / "iter_0000004", unwrap_model(back), back_optimizer, load_rng=False)
    back_sd = unwrap_model(back).sharded_state_dict()  # type: ignore[operator]
    back_gap = max((entry.data - bf16_state[f"optimizer.state.{entry.key}.fp32_param"]).abs().max().item()
                   for entry in back_sd.values())
    back_moments = _tensors(optimizer_sharded_state_dict(back_optimizer, unwrap_model(back), back_sd))
    back_moment_gap = max((v - bf16_state[k]).abs().max().item() for k, v in back_moments.items())

    # A checkpoint with weights but no AdamW moments (e.g. written by another tool).
    no_moments = str(Path(path) / "no_moments")
    dist_checkpointing.save(stage.sharded_state_dict(), no_moments,
                            common_state_dict={"iteration": 0, "optimizer": {"step": 0}})
    fresh, _, fresh_optimizer = _bf16_stage()
    with pytest.raises(OptimizerStateError) as error:
        load_checkpoint(no_moments, fresh, fresh_optimizer, load_rng=False)
    return {"saved_weights": saved_weights, "saved_moments": saved_moments, "masters": masters,
            "moments": {k: v for k, v in state.items() if not k.endswith(".fp32_param")},
            "bf16_weights": bf16_weights, "fp32_next": fp32_next, "bf16_next": bf16_next, "error": str(error.value),
            "back_gap": back_gap, "back_moment_gap": back_moment_gap}


@pytest.mark.slow  # 14-28 s depending on load: four optimizers on 2 processes, three checkpoints
def test_bf16_distributed_optimizer_resumes_an_fp32_plain_adamw_checkpoint(tmp_path):
    for rank in run_distributed(_fp32_to_bf16, 2, str(tmp_path / "ckpt"), tmp_dir=tmp_path):
        saved = rank["saved_weights"]
        assert rank["masters"].keys() == saved.keys()
        for key, weight in saved.items():
            torch.testing.assert_close(rank["masters"][key], weight, atol=0, rtol=0, msg=key)  # fp32, not rounded
            assert rank["bf16_weights"][key].dtype == torch.bfloat16
            torch.testing.assert_close(rank["bf16_weights"][key], weight.bfloat16(), atol=0, rtol=0, msg=key)
        assert rank["moments"].keys() == rank["saved_moments"].keys()
        for key, moment in rank["saved_moments"].items():
            torch.testing.assert_close(rank["moments"][key], moment, atol=0, rtol=0, msg=key)
        # bf16 forward/backward round differently; the curve goes on from the same point.
        torch.testing.assert_close(torch.tensor(rank["bf16_next"]), torch.tensor(rank["fp32_next"]), atol=2e-2, rtol=0)
        assert "holds no AdamW moments" in rank["error"] and "load_model" in rank["error"]
        assert rank["back_gap"] == 0 and rank["back_moment_gap"] == 0  # fp32 run <- bf16 run: masters are weights
