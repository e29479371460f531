"""vocab_parallel_cross_entropy at TP 1/2/4 against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_core import parallel_state as ps
from megatron_core.tensor_parallel import vocab_parallel_cross_entropy
from megatron_core.testing import run_distributed

SEQ, BATCH, VOCAB = 6, 3, 24
# (label_smoothing, ignore_index, logit scale): large scales check the max-subtraction.
CASES = [(0.0, -100, 1.0), (0.1, -100, 1.0), (0.0, 5, 1.0), (0.2, 7, 1.0), (0.0, -100, 200.0)]


def _data(scale: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=g) * scale + (1000.0 if scale > 1 else 0.0)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    target[0, 0] = target[2, 1] = ignore_index  # ignored positions (in or out of the vocab)
    upstream = torch.rand(SEQ, BATCH, generator=g)
    return logits, target, upstream


def _on_rank(tp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ps.initialize_model_parallel(tp)
    rank = ps.get_tensor_model_parallel_rank()
    out = []
    for eps, ignore, scale in CASES:
        logits, target, upstream = _data(scale, ignore)
        local = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_()  # [s, b, V/tp]
        loss = vocab_parallel_cross_entropy(local, target, label_smoothing=eps, ignore_index=ignore)
        loss.backward(upstream)
        out.append((loss.detach(), local.grad))
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_torch_cross_entropy(tp, tmp_path):
    results = run_distributed(_on_rank, tp, tp, tmp_dir=tmp_path)
    for i, (eps, ignore, scale) in enumerate(CASES):
        logits, target, upstream = _data(scale, ignore)
        logits = logits.clone().requires_grad_()
        ref = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), reduction="none", label_smoothing=eps,
                              ignore_index=ignore).view(SEQ, BATCH)
        ref.backward(upstream)
        for rank, rank_out in enumerate(results):
            loss = rank_out[i][0]
            assert loss.shape == target.shape and loss.dtype == torch.float32
            torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-6, msg=f"case {i} rank {rank}")
            assert torch.all(loss[target == ignore] == 0)
        grad = torch.cat([r[i][1] for r in results], dim=-1)
        torch.testing.assert_close(grad, logits.grad, atol=1e-5, rtol=0, msg=f"case {i}")
        assert torch.all(grad[target == ignore] == 0)


def test_bf16_logits_give_fp32_loss_and_bf16_grad():
    logits = torch.randn(4, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, VOCAB, (4,))
    loss = vocab_parallel_cross_entropy(logits, target)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target, reduction="none"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"logits shape \(4, 24\) does not match target shape \(5,\)"):
        vocab_parallel_cross_entropy(torch.randn(4, VOCAB), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        vocab_parallel_cross_entropy(torch.randn(4, VOCAB), torch.zeros(4, dtype=torch.long), 1.5)
