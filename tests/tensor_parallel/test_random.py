"""RNG tracker streams and activation recompute that replays dropout exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_core import parallel_state as ps
from megatron_core.tensor_parallel import (
    RNGTrackerError,
    checkpoint,
    get_cuda_rng_tracker,
    get_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
)
from megatron_core.testing import run_distributed


def test_tracker_streams_are_separate_and_resumable():
    tracker = get_rng_tracker()
    assert get_cuda_rng_tracker() is tracker and model_parallel_cuda_manual_seed is model_parallel_manual_seed
    model_parallel_manual_seed(42)
    outside = torch.get_rng_state()
    saved = tracker.get_states()
    with tracker.fork():
        a = torch.rand(8)
    with tracker.fork():
        b = torch.rand(8)
    assert torch.equal(torch.get_rng_state(), outside), "fork must not advance the default generator"
    assert not torch.equal(a, b), "the stream advances across forks"
    assert torch.equal(a, torch.rand(8, generator=torch.Generator().manual_seed(42 + 2718)))  # tp_rank 0
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(8), a), "set_states replays the stream"
    with tracker.fork("data-parallel-rng"):
        assert torch.equal(torch.rand(8), torch.rand(8, generator=torch.Generator().manual_seed(42)))

    with pytest.raises(RNGTrackerError, match="'model-parallel-rng' already exists"):
        tracker.add("model-parallel-rng", 1)
    with pytest.raises(RNGTrackerError, match="seed 42 .* already used by 'data-parallel-rng'"):
        tracker.add("other", 42)
    with pytest.raises(RNGTrackerError, match="'nope' is not registered"):
        with tracker.fork("nope"):
            pass


def test_fork_before_seeding_registers_a_default_stream(caplog):
    get_rng_tracker().reset()
    torch.manual_seed(5)
    with caplog.at_level("WARNING"), get_rng_tracker().fork():
        x = torch.rand(4)
    assert "model_parallel_manual_seed" in caplog.text
    assert torch.equal(x, torch.rand(4, generator=torch.Generator().manual_seed(5 + 2718)))


def _block(lin: torch.nn.Module, scale: float):
    def run(x: torch.Tensor, mask_note: str) -> tuple[torch.Tensor, torch.Tensor]:
        assert mask_note == "passed through"
        h = F.dropout(lin(x) * scale, 0.5)  # default stream
        with get_rng_tracker().fork():
            h = F.dropout(h, 0.5)  # model-parallel stream
        return h, h.sum(dim=-1)
    return run


def test_checkpoint_replays_dropout_and_restores_generators():
    model_parallel_manual_seed(3)
    lin = torch.nn.Linear(8, 8)
    run = _block(lin, 2.0)
    x = torch.randn(5, 8, requires_grad=True)
    start_cpu, start_tracker = torch.get_rng_state(), get_rng_tracker().get_states()

    h, s = run(x, "passed through")
    (h.sum() + s.pow(2).sum()).backward()
    ref = (h.detach(), x.grad.clone(), lin.weight.grad.clone())
    end_cpu, end_tracker = torch.get_rng_state(), get_rng_tracker().get_states()

    x.grad = None
    lin.zero_grad()
    torch.set_rng_state(start_cpu)
    get_rng_tracker().set_states(start_tracker)
    h, s = checkpoint(run, False, x, "passed through")
    (h.sum() + s.pow(2).sum()).backward()
    assert torch.equal(h, ref[0])
    assert torch.equal(x.grad, ref[1]) and torch.equal(lin.weight.grad, ref[2]), "recompute used other masks"
    # The recompute leaves every generator where the plain run left it.
    assert torch.equal(torch.get_rng_state(), end_cpu)
    assert all(torch.equal(get_rng_tracker().get_states()[k]["cpu"], v["cpu"]) for k, v in end_tracker.items())


def test_checkpoint_gives_param_grads_when_input_needs_none():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    lin(x).relu().sum().backward()
    want = (lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()
    out = checkpoint(lambda t: lin(t).relu(), False, x)
    out.sum().backward()
    assert torch.equal(lin.weight.grad, want[0]) and torch.equal(lin.bias.grad, want[1])  # as without recompute


def _masks_on_rank(tp: int) -> dict:
    ps.initialize_model_parallel(tp)
    model_parallel_manual_seed(42)
    ones = torch.ones(64)
    shared = F.dropout(ones, 0.5)
    with get_rng_tracker().fork():
        per_rank = F.dropout(ones, 0.5)

    # distribute_saved_activations: each rank keeps half of the input between forward and backward.
    lin = torch.nn.Linear(8, 8)
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8, requires_grad=True)

    def run(t: torch.Tensor) -> torch.Tensor:
        with get_rng_tracker().fork():
            return F.dropout(lin(t), 0.3)
    states = get_rng_tracker().get_states()
    checkpoint(run, True, x).sum().backward()
    grads = (x.grad.clone(), lin.weight.grad.clone())
    x.grad = None
    lin.zero_grad()
    get_rng_tracker().set_states(states)
    run(x).sum().backward()
    same = torch.equal(grads[0], x.grad) and torch.equal(grads[1], lin.weight.grad)
    return {"shared": shared, "per_rank": per_rank, "distributed_recompute_ok": same}


def test_per_rank_streams_differ_and_shared_stream_agrees(tmp_path):
    r0, r1 = run_distributed(_masks_on_rank, 2, 2, tmp_dir=tmp_path)
    assert torch.equal(r0["shared"], r1["shared"]), "replicated dropout must agree across TP ranks"
    assert not torch.equal(r0["per_rank"], r1["per_rank"]), "dropout inside fork() must differ per TP rank"
    assert r0["distributed_recompute_ok"] and r1["distributed_recompute_ok"]
