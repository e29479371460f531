"""The Trainer against a training loop written in plain PyTorch from the documented semantics.

The reference loop knows nothing of the toolkit's training package: ``torch.optim.AdamW`` with
weight decay on weight matrices only (biases and norm weights undecayed), the learning rate of
update ``i`` from the formula in ``WarmupCosineScheduler``'s docstring (rewritten here),
``torch.nn.utils.clip_grad_norm_``, and the loss as the mean over every loss-masked token of the
accumulated batch (not the mean of per-micro-batch means), computed with ``F.cross_entropy`` on the
model's logits. Only the data order is shared (``MicroBatchIterator``, tested on its own).

Norm weights and biases are perturbed first (they start at 1 and 0 otherwise), and samples carry
different numbers of loss tokens, so a wrong decay group, learning rate or token normalisation
shows in the losses and the parameters.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_core import TransformerConfig
from megatron_core.data.loader import MicroBatchIterator
from megatron_core.models.gpt import GPTModel
from megatron_core.training import Trainer, TrainingSettings
from specs.gpt import get_gpt_layer_local_spec

VOCAB, SEQ = 48, 12
LR, MIN_LR, WARMUP, DECAY_ITERS, WD, BETAS, EPS, CLIP = 3e-3, 3e-4, 2, 5, 0.3, (0.9, 0.95), 1e-8, 0.05


class RandomTokens(torch.utils.data.Dataset):
    """Random next-token samples whose loss masks keep a different number of tokens each."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=gen)
        keep = torch.randint(2, SEQ + 1, (n,), generator=gen)  # 2..SEQ loss tokens per sample
        self.mask = (torch.arange(SEQ).unsqueeze(0) < keep.unsqueeze(1)).float()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[i, :-1], "labels": self.tokens[i, 1:], "loss_mask": self.mask[i]}


def _model(seed: int = 3) -> GPTModel:
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
    with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor matter
        for p in model.parameters():
            if p.ndim < 2:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _settings(iters: int, accum: int, bf16: bool) -> TrainingSettings:
    return TrainingSettings(train_iters=iters, micro_batch_size=3, grad_accum_steps=accum, lr=LR, min_lr=MIN_LR,
                            warmup_iters=WARMUP, lr_decay_iters=DECAY_ITERS, weight_decay=WD, adam_beta1=BETAS[0],
                            adam_beta2=BETAS[1], adam_eps=EPS, clip_grad=CLIP, bf16=bf16, progress_bar=False,
                            device="cpu", seed=5)


def reference_lr(i: int) -> float:
    """The docstring's schedule: linear warmup to LR, cosine to MIN_LR at DECAY_ITERS, then MIN_LR."""
    if i < WARMUP:
        return LR * (i + 1) / WARMUP
    if i >= DECAY_ITERS:
        return MIN_LR
    t = (i - WARMUP) / (DECAY_ITERS - WARMUP)
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * t)) / 2


def reference_train(model: torch.nn.Module, data: torch.utils.data.Dataset, iters: int, accum: int,
                    bf16: bool) -> tuple[list[float], list[float]]:
    """Plain PyTorch: returns (mean loss per token of each update, pre-clip gradient norm of each)."""
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith(".bias") or "norm" in n.split(".")[-2]]
    decay = [p for n, p in named if not any(p is q for q in no_decay)]
    assert all(p.ndim >= 2 for p in decay) and all(p.ndim == 1 for p in no_decay)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, eps=EPS)
    batches = MicroBatchIterator(data, 3, seed=5)
    losses, norms = [], []
    for i in range(iters):
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(i)
        optimizer.zero_grad()
        micro = [next(batches) for _ in range(accum)]
        total_tokens = sum(float(mb["loss_mask"].sum()) for mb in micro)
        loss_sum = 0.0
        for mb in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(mb["tokens"], mb["position_ids"], None)  # [b, s, v]
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="none")
            summed = (token_loss * mb["loss_mask"].flatten()).sum()
            (summed / total_tokens).backward()
            loss_sum += float(summed.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        losses.append(loss_sum / total_tokens)
    return losses, norms


def _compare(iters: int, accum: int, bf16: bool, loss_tol: float, param_tol: float) -> None:
    data = RandomTokens(64)
    trained = _model()
    reference = copy.deepcopy(trained)
    result = Trainer(trained, _settings(iters, accum, bf16), data).train()
    ref_losses, ref_norms = reference_train(reference, data, iters, accum, bf16)
    assert min(ref_norms) > 2 * CLIP, "clipping must be active on every update for this test to mean anything"
    assert result.losses == pytest.approx(ref_losses, abs=loss_tol, rel=0)
    ref_params = dict(reference.named_parameters())
    for name, p in trained.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=param_tol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The run must have moved every tensor, by more than the tolerance.
    start = _model()
    moved = {n: float((p - q).detach().abs().max()) for (n, p), q in zip(trained.named_parameters(), start.parameters(),
                                                                strict=True)}
    assert min(moved.values()) > 10 * param_tol, moved


@pytest.mark.parametrize("accum", [1, 3])
def test_trainer_matches_plain_pytorch_loop(accum):
    """fp32, 6 updates through warmup, cosine and the floor (decay_iters=5), clipping on every update."""
    _compare(iters=6, accum=accum, bf16=False, loss_tol=1e-6, param_tol=1e-5)


def test_trainer_matches_plain_pytorch_loop_under_bf16_autocast():
    """bf16 autocast around the forward passes, the reference loop under the same autocast."""
    _compare(iters=4, accum=2, bf16=True, loss_tol=1e-6, param_tol=1e-5)

