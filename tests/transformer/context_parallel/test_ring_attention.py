"""Ring attention at CP=2 and CP=4 against plain full-sequence attention (forward and backward)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.testing import run_distributed
from megatron_core.transformer.context_parallel import cp_chunk_ids, ring_attention, split_for_cp_rank
from megatron_core.transformer.context_parallel.ring_attention import _dropout_keep

B, NP, S, HN = 2, 4, 16, 8


def _inputs(ng: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, NP, S, HN, generator=g)
    k = torch.randn(B, ng, S, HN, generator=g)
    v = torch.randn(B, ng, S, HN, generator=g)
    dout = torch.randn(B, NP, S, HN, generator=g)
    return q, k, v, dout


def _full_dropout_keep(cp: int, seed: int, p: float) -> torch.Tensor:
    """The [b, np, S, S] keep-mask the ring draws block by block, assembled in global positions."""
    c = S // (2 * cp)
    keep = torch.zeros(B, NP, S, S)
    for i in range(2 * cp):
        for j in range(2 * cp):
            keep[:, :, i * c:(i + 1) * c, j * c:(j + 1) * c] = _dropout_keep(
                seed + i * 2 * cp + j, torch.Size((B, NP, c, c)), p, torch.device("cpu"))
    return keep


def _reference(causal: bool, ng: int, cp: int, dropout_p: float, seed: int) -> dict[str, torch.Tensor]:
    q, k, v, dout = (t.double().requires_grad_() for t in _inputs(ng))
    kr, vr = (t.repeat_interleave(NP // ng, dim=1) for t in (k, v))
    scores = q @ kr.transpose(-1, -2) / math.sqrt(HN)
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    if dropout_p:
        probs = probs * _full_dropout_keep(cp, seed, dropout_p).double()
    out = probs @ vr
    out.backward(dout.detach())
    return {"out": out.detach().float(), "dq": q.grad.float(), "dk": k.grad.float(), "dv": v.grad.float()}


def _ring(cp: int, causal: bool, ng: int, dropout_p: float, seed: int) -> dict[str, torch.Tensor]:
    ps.initialize_model_parallel(context_parallel_size=cp)
    rank = ps.get_context_parallel_rank()
    q, k, v, dout = (split_for_cp_rank(t, rank, cp, seq_dim=2) for t in _inputs(ng))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, ps.get_context_parallel_group(), causal=causal, softmax_scale=1 / math.sqrt(HN),
                         dropout_p=dropout_p, seed=seed)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("cp,causal,ng,dropout_p", [
    (2, True, NP, 0.0), (2, False, 2, 0.0), (4, True, 2, 0.0), (2, True, 1, 0.3), (4, False, NP, 0.3),
])
def test_ring_attention_equals_full_attention(tmp_path, cp, causal, ng, dropout_p):
    seed = 1234
    expected = _reference(causal, ng, cp, dropout_p, seed)
    results = run_distributed(_ring, cp, cp, causal, ng, dropout_p, seed, tmp_dir=tmp_path)
    for rank, got in enumerate(results):
        for name, value in expected.items():
            mine = split_for_cp_rank(value, rank, cp, seq_dim=2)
            torch.testing.assert_close(got[name], mine, atol=1e-5, rtol=1e-5, msg=f"rank {rank} {name}")


def test_chunks_pair_early_with_late():
    assert [cp_chunk_ids(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    positions = split_for_cp_rank(torch.arange(16)[None], 1, 2)
    assert positions.tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    with pytest.raises(ValueError, match="divisible by 2 x context_parallel_size = 4"):
        split_for_cp_rank(torch.arange(10)[None], 0, 2)
