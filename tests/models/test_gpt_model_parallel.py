"""A tied-embedding GPT under TP x PP x DP layouts: one step's loss and gathered gradients, and five
AdamW steps, equal a single process (fp32)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from megatron_core import TransformerConfig
from megatron_core import parallel_state as ps
from megatron_core.testing import run_distributed
from tests.models.gpt_harness import (
    LAYERS,
    assemble,
    evaluate,
    full_weights,
    make_config,
    make_steps,
    micro_batches,
    reference,
    setup,
    sharded_grads,
    train_steps,
)

FULL = full_weights()
STEPS = make_steps(5)
TOL = 1e-5


@functools.cache
def _reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    return reference(FULL, STEPS)


def _train(tp: int, pp: int, num_microbatches: int, overrides: dict[str, Any]) -> dict[str, Any]:
    model, optimizer = setup(tp, pp, FULL, **overrides)
    evaluation = evaluate(model, STEPS[0], num_microbatches)
    untouched = all(p.grad is None for p in model.parameters())
    losses, grads = train_steps(model, optimizer, STEPS, num_microbatches)
    return {"losses": losses, "grads": grads, "dp": ps.get_data_parallel_world_size(), "eval": evaluation,
            "eval_left_no_grads": untouched}


LAYOUTS = [
    # world, TP, PP, micro-batches per DP rank, config overrides
    pytest.param(4, 2, 2, 4, {}, id="tp2-pp2"),  # more micro-batches than stages
    pytest.param(4, 2, 2, 2, {"sequence_parallel": True}, id="tp2-pp2-sp"),  # [s/tp, b, h] between stages
    pytest.param(4, 1, 4, 4, {}, id="pp4"),  # exactly as many
    pytest.param(4, 2, 1, 2, {}, id="tp2-dp2"),
    pytest.param(4, 1, 1, 2, {}, id="dp4"),
    pytest.param(2, 1, 2, 4, {}, id="pp2"),
    pytest.param(2, 1, 2, 2, {"num_layers_in_first_pipeline_stage": 1}, id="pp2-uneven-1+3"),
]


@pytest.mark.parametrize("world, tp, pp, num_microbatches, overrides", LAYOUTS)
def test_layout_matches_single_process(tmp_path, world, tp, pp, num_microbatches, overrides):
    ref_losses, ref_grads = _reference()
    per_rank = run_distributed(_train, world, tp, pp, num_microbatches, overrides, tmp_dir=tmp_path)
    assert per_rank[0]["dp"] == world // (tp * pp)

    grads, copy_gap = assemble([r["grads"] for r in per_rank])
    assert sorted(grads) == sorted(ref_grads), "every parameter's gradient is gathered exactly once"
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, atol=TOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    # TP-replicated tensors, data-parallel replicas and the last stage's tied embedding copy agree.
    assert copy_gap < 1e-6

    for r in per_rank:
        assert r["losses"] == per_rank[0]["losses"]
    torch.testing.assert_close(torch.tensor(per_rank[0]["losses"]), torch.tensor(ref_losses), atol=TOL, rtol=0)
    assert per_rank[0]["losses"][-1] < per_rank[0]["losses"][0]
    # Forward-only evaluation before training: the first step's loss, and no gradients.
    assert all(r["eval_left_no_grads"] for r in per_rank)
    assert abs(per_rank[0]["eval"] - ref_losses[0]) < TOL


def _hidden_dropout_step(tp: int) -> dict[str, Any]:
    """One forward/backward of the whole first batch with hidden dropout 0.3 (the CPU 16-bit masks)."""
    model, _ = setup(tp, 1, FULL, hidden_dropout=0.3)
    batch = micro_batches(STEPS[0], 1)[0]
    torch.manual_seed(11)  # TP ranks share the default generator's stream: replicated activations, same masks
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()
    loss.backward()
    return {"loss": loss.item(), "grads": sharded_grads(model)}


def test_tensor_parallel_hidden_dropout_matches_single_process(tmp_path):
    reference_run = _hidden_dropout_step(1)
    per_rank = run_distributed(_hidden_dropout_step, 2, 2, tmp_dir=tmp_path)
    assert abs(reference_run["loss"] - _reference()[0][0]) > 1e-3  # the masks change the loss
    ref_grads, _ = assemble([reference_run["grads"]])
    grads, copy_gap = assemble([r["grads"] for r in per_rank])
    for r in per_rank:
        assert abs(r["loss"] - reference_run["loss"]) < TOL
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, atol=TOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert copy_gap < 1e-6


# ---------------------------------------------------------------------------- bad layouts
def _init(tp: int, pp: int) -> str:
    try:
        ps.initialize_model_parallel(tp, pp)
    except ps.ParallelStateError as e:
        return str(e)
    finally:
        # Nothing else is collective here: keep a fast rank from leaving while its peer still connects.
        torch.distributed.barrier()
    return "no error"


def test_world_not_divisible_by_tp_times_pp(tmp_path):
    messages = run_distributed(_init, 2, 2, 2, tmp_dir=tmp_path)
    assert all("world size 2 is not divisible" in m and "= 4" in m for m in messages)


def test_layers_not_divisible_by_pp_without_overrides():
    with pytest.raises(ValueError, match=r"num_layers=.*cannot be split evenly over 3 pipeline stages"):
        make_config(pp=3)
    # The override that fixes it: 2 layers on the first stage, 1 on each of the other two.
    TransformerConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, pipeline_model_parallel_size=3,
                      num_layers_in_first_pipeline_stage=2)
    with pytest.raises(ValueError, match="do not add up"):
        make_config(pp=2, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=3)


def _config_disagrees_with_state() -> str:
    ps.initialize_model_parallel(1, 2)
    try:
        setup(1, 4, FULL)
    except ValueError as e:
        return str(e)
    return "no error"


def test_config_pipeline_size_must_match_the_launched_layout(tmp_path):
    for message in run_distributed(_config_disagrees_with_state, 2, tmp_dir=tmp_path):
        assert message.startswith("config.pipeline_model_parallel_size=4 but parallel_state has "
                                  "pipeline_model_parallel_size=2. Fix: call parallel_state.initialize_model_parallel(")
