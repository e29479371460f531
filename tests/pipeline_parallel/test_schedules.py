"""Schedules on a toy stage model against single-process autograd: 1F1B, forward-only, data parallel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.distributed import DistributedDataParallel, wrap_data_parallel
from megatron_core.pipeline_parallel import (
    ScheduleError,
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
from megatron_core.testing import DistributedTestError, run_distributed
from tests.pipeline_parallel.toy import (
    build_stage,
    make_batches,
    make_weights,
    reference,
    reference_outputs,
    stage_grads,
    toy_forward_step,
)

HIDDEN, SEQ, MBS, LAYERS = 8, 4, 2, 4
WEIGHTS = make_weights(LAYERS, HIDDEN)
BATCHES = make_batches(16, MBS, SEQ, HIDDEN)


def _schedule(stage: torch.nn.Module, batches: list[Any], forward_only: bool = False, **kw: Any) -> list[Any]:
    return get_forward_backward_func()(
        forward_step_func=toy_forward_step, data_iterator=iter(batches), model=stage,
        num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only, **kw)


def _merge(per_rank: list[dict[int, Any]]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for grads in per_rank:
        out.update(grads)
    return out


def _assert_matches(losses: list[float], grads: dict[int, Any], batches: list[Any], atol: float = 1e-6) -> None:
    ref_losses, ref_grads = reference(WEIGHTS, batches)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=atol, rtol=0)
    assert sorted(grads) == sorted(ref_grads)
    for i, (w, b) in ref_grads.items():
        torch.testing.assert_close(grads[i][0], w, atol=atol, rtol=0)
        torch.testing.assert_close(grads[i][1], b, atol=atol, rtol=0)


def _assert_outputs(collected: list[Any], batches: list[Any]) -> None:
    """Collected non-loss data: the whole stack's output of each micro-batch, in micro-batch order."""
    want = reference_outputs(WEIGHTS, batches)
    assert len(collected) == len(want)
    for i, (got, ref) in enumerate(zip(collected, want, strict=True)):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0, msg=lambda m, i=i: f"micro-batch {i}: {m}")


# ---------------------------------------------------------------------------- pipeline only
def _pipeline(micro_counts: list[int]) -> list[dict[str, Any]]:
    ps.initialize_model_parallel(1, torch.distributed.get_world_size())
    out = []
    for m in micro_counts:
        stage = build_stage(WEIGHTS)
        losses = _schedule(stage, BATCHES[:m])
        evaluation = _schedule(build_stage(WEIGHTS), BATCHES[:m], forward_only=True)
        probe = build_stage(WEIGHTS)
        _schedule(probe, BATCHES[:m], forward_only=True)
        collected = _schedule(build_stage(WEIGHTS), BATCHES[:m], forward_only=True, collect_non_loss_data=True)
        out.append({
            "collected": collected,
            "losses": [d["loss"].item() for d in losses],
            "eval": [d["loss"].item() for d in evaluation],
            "grads": stage_grads(stage),
            "eval_left_no_grads": all(p.grad is None for p in probe.parameters()),
        })
    return out


@pytest.mark.parametrize("stages, micro_counts", [(2, [4, 2, 1]), (4, [8, 4, 2])])
def test_1f1b_matches_single_process(tmp_path, stages, micro_counts):
    """More micro-batches than stages, exactly as many, and fewer; plus forward-only evaluation."""
    per_rank = run_distributed(_pipeline, stages, micro_counts, tmp_dir=tmp_path)
    for j, m in enumerate(micro_counts):
        results = [r[j] for r in per_rank]
        assert all(r["losses"] == [] for r in results[:-1]), "only the last stage returns losses"
        assert len(results[-1]["losses"]) == m
        _assert_matches(results[-1]["losses"], _merge([r["grads"] for r in results]), BATCHES[:m])
        torch.testing.assert_close(torch.tensor(results[-1]["eval"]), torch.tensor(results[-1]["losses"]))
        assert all(r["collected"] == [] for r in results[:-1]), "only the last stage collects outputs"
        _assert_outputs(results[-1]["collected"], BATCHES[:m])
        assert all(r["eval_left_no_grads"] for r in results)


def test_no_pipelining_single_process():
    stage = build_stage(WEIGHTS)
    assert get_forward_backward_func() is forward_backward_no_pipelining
    losses = _schedule(stage, BATCHES[:3])
    _assert_matches([d["loss"].item() for d in losses], stage_grads(stage), BATCHES[:3])
    collected = _schedule(build_stage(WEIGHTS), BATCHES[:2], forward_only=True, collect_non_loss_data=True)
    _assert_outputs(collected, BATCHES[:2])


# ---------------------------------------------------------------------------- with data parallel
def _data_parallel(pp: int, m: int) -> dict[str, Any]:
    ps.initialize_model_parallel(1, pp)
    dp_rank = ps.get_data_parallel_rank()
    batches = BATCHES[dp_rank * m:(dp_rank + 1) * m]
    wrapped = wrap_data_parallel(build_stage(WEIGHTS))
    if pp > 1:
        # Tiny buckets: several all-reduces, with parameters of different sizes in each.
        wrapped = DistributedDataParallel(build_stage(WEIGHTS), bucket_size=50)
    losses = _schedule(wrapped, batches)
    result = {"kind": type(wrapped).__module__, "losses": [d["loss"].item() for d in losses],
              "grads": stage_grads(wrapped.module), "dp_rank": dp_rank}
    if pp > 1:
        torch_ddp = torch.nn.parallel.DistributedDataParallel(build_stage(WEIGHTS), process_group=ps.get_data_parallel_group())
        try:
            forward_backward_pipelining_without_interleaving(
                forward_step_func=toy_forward_step, data_iterator=iter(batches), model=torch_ddp,
                num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS)
        except ScheduleError as e:
            result["torch_ddp_error"] = str(e)
    return result


@pytest.mark.parametrize("world, pp", [(2, 1), (4, 2)])
def test_data_parallel_averages_gradients(tmp_path, world, pp):
    m = 3
    dp = world // pp
    per_rank = run_distributed(_data_parallel, world, pp, m, tmp_dir=tmp_path)
    assert {r["kind"] for r in per_rank} == {"megatron_core.distributed.distributed_data_parallel"}
    last = [r for r in per_rank if r["losses"]]
    assert len(last) == dp
    losses = [loss for r in sorted(last, key=lambda r: r["dp_rank"]) for loss in r["losses"]]
    # Every replica ends with the same averaged gradients: check each pipeline copy against the reference.
    for d in range(dp):
        replica = [r for r in per_rank if r["dp_rank"] == d]
        _assert_matches(losses, _merge([r["grads"] for r in replica]), BATCHES[:dp * m])
    if pp > 1:
        assert all("DistributedDataParallel" in r["torch_ddp_error"] for r in per_rank)


# ---------------------------------------------------------------------------- errors
def _mismatch(kind: str) -> None:
    ps.initialize_model_parallel(1, 2)
    seq = SEQ
    stage = build_stage(WEIGHTS)
    if kind == "seq_length" and ps.is_pipeline_last_stage():
        seq = SEQ + 2  # the last stage was told another sequence length
    if kind == "hidden" and ps.is_pipeline_first_stage():
        stage = build_stage(WEIGHTS, out_hidden=HIDDEN + 4)
    forward_backward_pipelining_without_interleaving(
        forward_step_func=toy_forward_step, data_iterator=iter(BATCHES[:2]), model=stage, num_microbatches=2,
        seq_length=seq, micro_batch_size=MBS)


def test_stages_disagreeing_on_shape_fail_naming_both(tmp_path):
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_mismatch, 2, "seq_length", tmp_dir=tmp_path, timeout=60)
    text = str(info.value)
    assert "PipelineShapeError" in text and "rank 1 of 2" in text
    assert f"expected an input activation of shape ({SEQ + 2}, {MBS}, {HIDDEN})" in text
    assert f"received shape ({SEQ}, {MBS}, {HIDDEN})" in text and "pipeline stage 0" in text


def test_stage_producing_wrong_shape_fails(tmp_path):
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_mismatch, 2, "hidden", tmp_dir=tmp_path, timeout=60)
    text = str(info.value)
    assert "PipelineShapeError" in text
    assert f"shape ({SEQ}, {MBS}, {HIDDEN + 4})" in text and f"shape ({SEQ}, {MBS}, {HIDDEN})" in text


def test_list_of_chunks_and_bad_counts_rejected():
    stage = build_stage(WEIGHTS)
    with pytest.raises(ScheduleError, match="one model chunk"):
        forward_backward_no_pipelining(forward_step_func=toy_forward_step, data_iterator=iter(BATCHES),
                                       model=[stage, stage], num_microbatches=1, seq_length=SEQ, micro_batch_size=MBS)
    with pytest.raises(ScheduleError, match="num_microbatches=0"):
        forward_backward_no_pipelining(forward_step_func=toy_forward_step, data_iterator=iter(BATCHES),
                                       model=stage, num_microbatches=0, seq_length=SEQ, micro_batch_size=MBS)
