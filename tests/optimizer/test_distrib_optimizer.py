"""The distributed optimizer (reduce-scattered fp32 gradients, sharded fp32 masters and AdamW moments,
all-gathered parameters) against one process with plain AdamW, on real gloo processes.

Every layout starts from the same full weights (copied in by checkpoint key, ``gpt_harness``) and
trains on the same global batches; losses and final parameters must match the single process, and
overlapping the gradient reduction with backward (tiny buckets: many reductions in flight) or the
parameter all-gather with the next forward must change nothing at all.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.dist_checkpointing.mapping import is_main_replica
from megatron_core.distributed import unwrap_model
from megatron_core.testing import run_distributed
from megatron_core.training.optimizer import build_adamw
from tests.models.gpt_harness import (
    LR,
    build_gpt,
    full_weights,
    load_full,
    make_config,
    make_steps,
    setup_distributed_optimizer,
    train_steps,
)

FULL = full_weights(seed=0)
STEPS = make_steps(10, seed=3)
TOL = 1e-6


def full_params(model: torch.nn.Module) -> dict[str, tuple[tuple[slice, ...], torch.Tensor]]:
    """This rank's main-replica parameter pieces by checkpoint key (global box, values)."""
    out = {}
    for sh in unwrap_model(model).sharded_state_dict().values():  # type: ignore[operator]
        if is_main_replica(sh.replica_id):
            out[f"{sh.key}@{sh.global_offset}"] = (sh.global_slice(), sh.data.detach().float().clone())
    return out


def assemble(per_rank: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    full = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in FULL.items()}
    for pieces in per_rank:
        for name, (box, value) in pieces.items():
            key = name.split("@")[0]
            full[key][box] = value.reshape(full[key][box].shape)
    return full


def reference(num_steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, plain AdamW, the same global batches."""
    ps.destroy_model_parallel()
    model = build_gpt(make_config())
    load_full(model, FULL)
    losses, _ = train_steps(model, build_adamw(model, lr=LR), STEPS[:num_steps], 1)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items() if k in FULL}


REFERENCE = reference(len(STEPS))


# ---------------------------------------------------------------------------- parity with one process
def _layout(tp: int, pp: int, num_microbatches: int) -> dict[str, Any]:
    runs = {}
    for overlap in (False, True):
        # Same small buckets both ways (several reductions in flight): with more than two ranks a
        # different bucketing would change the order of gloo's sums.
        model, optimizer = setup_distributed_optimizer(tp, pp, FULL, bucket_size=3000, overlap=overlap)
        losses, _ = train_steps(model, optimizer, STEPS, num_microbatches)
        optimizer.finish_param_sync()
        runs[overlap] = {"losses": losses, "params": full_params(model)}
    return {"off": runs[False], "on": runs[True], "buckets": [len(b.buckets) for b in model.buffers_by_dtype]}


@pytest.mark.slow
@pytest.mark.parametrize("world, tp, pp, num_microbatches", [
    pytest.param(2, 1, 1, 2, id="dp2-accum2"),
    pytest.param(4, 1, 1, 1, id="dp4"),
    pytest.param(4, 2, 1, 2, id="tp2-dp2"),
    pytest.param(4, 1, 2, 2, id="pp2-dp2"),
])
def test_distributed_optimizer_matches_one_process(tmp_path, world, tp, pp, num_microbatches):
    # 20 training steps per rank: a generous timeout for a loaded 2-core machine.
    per_rank = run_distributed(_layout, world, tp, pp, num_microbatches, tmp_dir=tmp_path, timeout=900)
    ref_losses, ref_params = REFERENCE
    assert all(sum(r["buckets"]) > 2 for r in per_rank), "the overlapped run must use several buckets"
    for kind in ("off", "on"):
        for rank in per_rank:
            torch.testing.assert_close(torch.tensor(rank[kind]["losses"]), torch.tensor(ref_losses), atol=TOL, rtol=0)
        params = assemble([r[kind]["params"] for r in per_rank])
        for key, value in ref_params.items():
            # 1e-5: the key part of linear_qkv.bias has a gradient that is zero up to rounding (softmax
            # ignores it) and Adam's m / sqrt(v) turns rounding noise into updates (~3e-6 measured).
            torch.testing.assert_close(params[key], value, atol=1e-5, rtol=0, msg=key)
    for rank in per_rank:  # overlap changes when reductions run, never what they compute
        assert rank["on"]["losses"] == rank["off"]["losses"]
        for name, (_, value) in rank["off"]["params"].items():
            assert torch.equal(rank["on"]["params"][name][1], value), name


# ---------------------------------------------------------------------------- memory
def _state_bytes() -> dict[str, int]:
    model, optimizer = setup_distributed_optimizer(1, 1, FULL)
    train_steps(model, optimizer, STEPS[:1], 1)
    plain_model = build_gpt(make_config())
    plain = build_adamw(plain_model, lr=LR)
    train_steps(plain_model, plain, STEPS[:1], 1)
    plain_bytes = sum(t.nbytes for s in plain.state.values() for t in s.values() if t.ndim > 0)
    return {"sharded": optimizer.state_bytes(), "plain": plain_bytes}


@pytest.mark.parametrize("world", [2, 4])
def test_optimizer_state_per_rank_is_one_over_dp(tmp_path, world):
    per_rank = run_distributed(_state_bytes, world, tmp_dir=tmp_path)
    for rank in per_rank:
        ratio = rank["sharded"] / rank["plain"]
        # Padding each bucket to a multiple of DP adds at most DP - 1 elements per bucket.
        assert 1 / world <= ratio < 1 / world + 1e-3, ratio
    assert sum(r["sharded"] for r in per_rank) >= per_rank[0]["plain"]


# ---------------------------------------------------------------------------- bf16 + fp32 masters
def _bf16_reference(num_steps: int, dp: int = 2, m: int = 2) -> list[float]:
    """Plain PyTorch, one process: a bf16 model whose micro-batch gradients (``dp`` replicas x ``m``
    micro-batches) are summed in fp32 in the same order, and fp32 master weights under torch AdamW."""
    model = build_gpt(make_config(params_dtype="bfloat16"))
    load_full(model, FULL)
    params = list(model.parameters())
    masters = [p.detach().float().clone() for p in params]
    groups = [{"params": [w for w, p in zip(masters, params, strict=True) if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [w for w, p in zip(masters, params, strict=True) if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    losses = []
    for step in STEPS[:num_steps]:
        per_replica, mbs = step["tokens"].shape[0] // dp, step["tokens"].shape[0] // dp // m
        total = [torch.zeros_like(w) for w in masters]
        step_losses = []
        for r in range(dp):
            replica = [torch.zeros_like(w) for w in masters]
            for i in range(m):
                rows = slice(r * per_replica + i * mbs, r * per_replica + (i + 1) * mbs)
                tokens, labels = step["tokens"][rows], step["labels"][rows]
                positions = torch.arange(tokens.shape[1]).expand_as(tokens)
                loss = model(tokens, positions, None, labels=labels).float().mean()
                model.zero_grad(set_to_none=True)
                (loss / m).backward()
                for acc, p in zip(replica, params, strict=True):
                    acc.add_(p.grad)
                step_losses.append(loss.item())
            for acc, part in zip(total, replica, strict=True):
                acc.add_(part.div_(dp))
        for w, g in zip(masters, total, strict=True):
            w.grad = g
        optimizer.step()
        with torch.no_grad():
            for w, p in zip(masters, params, strict=True):
                p.copy_(w)
        losses.append(sum(step_losses) / len(step_losses))
    return losses


def _bf16_dp2() -> dict[str, Any]:
    model, optimizer = setup_distributed_optimizer(1, 1, FULL, params_dtype="bfloat16")
    losses, _ = train_steps(model, optimizer, STEPS[:6], 2)
    masters = [s.master for s in optimizer.shards]
    # The reference runs here too: bf16 CPU kernels may round differently under other thread counts.
    return {"losses": losses, "reference": _bf16_reference(6), "dtypes": {str(p.dtype) for p in model.parameters()},
            "master_dtypes": {str(m.dtype) for m in masters},
            "grad_dtypes": {str(b.grad_data.dtype) for b in model.buffers_by_dtype}}


def test_bf16_params_with_fp32_masters_match_fp32_master_reference(tmp_path):
    for rank in run_distributed(_bf16_dp2, 2, tmp_dir=tmp_path):
        reference_losses = rank["reference"]
        assert rank["dtypes"] == {"torch.bfloat16"}
        assert rank["master_dtypes"] == {"torch.float32"} and rank["grad_dtypes"] == {"torch.float32"}
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(reference_losses), atol=TOL, rtol=0)
