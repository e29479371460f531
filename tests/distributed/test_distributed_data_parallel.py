"""Our DistributedDataParallel: with overlap_grad_reduce the bucket reductions start inside backward."""

from __future__ import annotations

from typing import Any

import torch

from megatron_core import parallel_state as ps
from megatron_core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron_core.testing import run_distributed
from tests.models.gpt_harness import build_gpt, full_weights, load_full, make_config, make_steps

FULL = full_weights(seed=0)
STEP = make_steps(1, seed=3)[0]


def _launched_during_backward(overlap: bool) -> dict[str, Any]:
    ps.initialize_model_parallel(1, 1)
    model = build_gpt(make_config())
    load_full(model, FULL)
    ddp = DistributedDataParallel(model, bucket_size=5000,
                                  ddp_config=DistributedDataParallelConfig(overlap_grad_reduce=overlap))
    rank = ps.get_data_parallel_rank()
    tokens, labels = STEP["tokens"][rank * 4:(rank + 1) * 4], STEP["labels"][rank * 4:(rank + 1) * 4]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    ddp(tokens, positions, None, labels=labels).float().mean().backward()
    buckets = [b for buf in ddp.buffers_by_dtype for b in buf.buckets]
    in_flight = sum(b.grad_handle is not None or b.grad_reduced for b in buckets)
    finalize_model_grads([ddp])
    return {"in_flight": in_flight, "buckets": len(buckets),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_overlap_launches_bucket_reductions_inside_backward(tmp_path):
    on = run_distributed(_launched_during_backward, 2, True, tmp_dir=tmp_path)
    off = run_distributed(_launched_during_backward, 2, False, tmp_dir=tmp_path)
    for rank_on, rank_off in zip(on, off, strict=True):
        assert rank_on["buckets"] > 3
        # Every bucket is complete once backward returns: all were launched by the hooks.
        assert rank_on["in_flight"] == rank_on["buckets"]
        assert rank_off["in_flight"] == 0, "without overlap nothing is reduced before finish_grad_sync"
        for name, grad in rank_on["grads"].items():
            assert torch.equal(grad, rank_off["grads"][name]), name
    for name, grad in on[0]["grads"].items():
        assert torch.equal(grad, on[1]["grads"][name]), "replicas end with the same averaged gradients"
