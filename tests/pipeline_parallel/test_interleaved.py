"""Interleaved 1F1B (virtual pipeline) on the toy stack against single-process autograd and against 1F1B."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.distributed import DistributedDataParallel
from megatron_core.pipeline_parallel import (
    ScheduleError,
    forward_backward_pipelining_with_interleaving,
    get_forward_backward_func,
)
from megatron_core.testing import DistributedTestError, run_distributed
from tests.pipeline_parallel.toy import ToyStage, make_batches, make_weights, reference, toy_forward_step

HIDDEN, SEQ, MBS, LAYERS = 8, 4, 2, 8
WEIGHTS = make_weights(LAYERS, HIDDEN)
BATCHES = make_batches(16, MBS, SEQ, HIDDEN)


def build_chunks(v: int, **kwargs: Any) -> tuple[list[ToyStage], list[int]]:
    """This rank's ``v`` chunks: chunk ``c`` holds piece ``c * p + rank`` of the stack; and their first layers."""
    p, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    per = LAYERS // (p * v)
    chunks, offsets = [], []
    for c in range(v):
        ps.set_virtual_pipeline_model_parallel_rank(c)
        start = (c * p + rank) * per
        chunks.append(ToyStage(WEIGHTS, start, start + per, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                               **kwargs))
        offsets.append(start)
    ps.set_virtual_pipeline_model_parallel_rank(0)
    return chunks, offsets


def _grads(chunks: list[Any], offsets: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for chunk, offset in zip(chunks, offsets, strict=True):
        inner = chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
        for i, layer in enumerate(inner.layers):
            out[offset + i] = (layer.weight.grad.clone(), layer.bias.grad.clone())
    return out


def _interleaved(pp: int, v: int, m: int, wrap: bool) -> dict[str, Any]:
    ps.initialize_model_parallel(1, pp, virtual_pipeline_model_parallel_size=v)
    assert get_forward_backward_func() is forward_backward_pipelining_with_interleaving
    chunks, offsets = build_chunks(v)
    model: list[Any] = [DistributedDataParallel(c, bucket_size=50) for c in chunks] if wrap else list(chunks)
    dicts = forward_backward_pipelining_with_interleaving(
        forward_step_func=toy_forward_step, data_iterator=[iter(BATCHES[:m]) for _ in model], model=model,
        num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS)
    evaluation = forward_backward_pipelining_with_interleaving(
        forward_step_func=toy_forward_step, data_iterator=[iter(BATCHES[:m]) for _ in model],
        model=build_chunks(v)[0], num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS, forward_only=True)
    return {"losses": [d["loss"].item() for d in dicts], "eval": [d["loss"].item() for d in evaluation],
            "grads": _grads(model, offsets)}


@pytest.mark.parametrize("pp, v, m", [(2, 2, 4), (2, 2, 2), (4, 2, 8), (2, 4, 4)])
def test_interleaved_matches_single_process(tmp_path, pp, v, m):
    per_rank = run_distributed(_interleaved, pp, pp, v, m, False, tmp_dir=tmp_path)
    ref_losses, ref_grads = reference(WEIGHTS, BATCHES[:m])
    assert all(r["losses"] == [] for r in per_rank[:-1]), "only the last stage returns losses"
    torch.testing.assert_close(torch.tensor(per_rank[-1]["losses"]), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(per_rank[-1]["eval"]), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    grads = {i: g for r in per_rank for i, g in r["grads"].items()}
    assert sorted(grads) == list(range(LAYERS))
    for i, (w, b) in ref_grads.items():
        torch.testing.assert_close(grads[i][0], w, atol=1e-6, rtol=0)
        torch.testing.assert_close(grads[i][1], b, atol=1e-6, rtol=0)


def test_interleaved_with_data_parallel_chunks(tmp_path):
    """PP=2 x VPP=2, each chunk in our DDP (DP=1 here: the per-chunk no_sync gates and finalize path)."""
    per_rank = run_distributed(_interleaved, 2, 2, 2, 4, True, tmp_dir=tmp_path)
    _, ref_grads = reference(WEIGHTS, BATCHES[:4])
    grads = {i: g for r in per_rank for i, g in r["grads"].items()}
    for i, (w, _) in ref_grads.items():
        torch.testing.assert_close(grads[i][0], w, atol=1e-6, rtol=0)


def _wrong_counts() -> None:
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=2)
    chunks, _ = build_chunks(2)
    forward_backward_pipelining_with_interleaving(
        forward_step_func=toy_forward_step, data_iterator=[iter(BATCHES) for _ in chunks], model=chunks,
        num_microbatches=3, seq_length=SEQ, micro_batch_size=MBS)


def test_microbatches_not_multiple_of_pipeline_size_rejected(tmp_path):
    with pytest.raises(DistributedTestError, match="multiple of the pipeline size 2"):
        run_distributed(_wrong_counts, 2, tmp_dir=tmp_path, timeout=60)


def test_single_model_rejected():
    with pytest.raises(ScheduleError, match="one per chunk"):
        forward_backward_pipelining_with_interleaving(
            forward_step_func=toy_forward_step, data_iterator=iter(BATCHES), model=ToyStage(WEIGHTS, 0, 8, True, True),
            num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS)
