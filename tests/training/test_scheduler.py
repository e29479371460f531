import math

import pytest
import torch

from megatron_core.training import WarmupCosineScheduler


def _opt():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def test_warmup_then_cosine_then_floor():
    opt = _opt()
    sched = WarmupCosineScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14)
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert seen[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # midpoint = 0.55
    assert seen[9] == pytest.approx(0.55)
    assert seen[13] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))
    assert seen[14:] == pytest.approx([0.1, 0.1])
    assert all(a >= b for a, b in zip(seen[3:], seen[4:], strict=False))


def test_state_round_trip_and_validation():
    opt = _opt()
    sched = WarmupCosineScheduler(opt, 1e-3, 1e-4, 10, 100)
    for _ in range(37):
        sched.step()
    other_opt = _opt()
    other = WarmupCosineScheduler(other_opt, 1e-3, 1e-4, 10, 100)
    other.load_state_dict(sched.state_dict())
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == sched.lr_at(37)
    with pytest.raises(ValueError, match="min_lr"):
        WarmupCosineScheduler(opt, 1e-4, 1e-3, 1, 10)
    with pytest.raises(ValueError, match="decay_iters"):
        WarmupCosineScheduler(opt, 1e-3, 1e-4, 20, 10)
