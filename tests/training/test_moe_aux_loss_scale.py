"""The MoE aux / z losses through the Trainer at DP=2 with 2 micro-batches of gradient accumulation.

The gradients the Trainer leaves (DDP path: schedule, bucketed reduction, expert buffers) must equal
those of one explicit objective computed by hand in one process with plain autograd::

    sum of per-token losses over the global batch / global token count
      + mean over the 4 micro-batches (2 replicas x 2) of sum over layers (aux_loss + z_loss)

with the losses written here from their definitions (Megatron-Core's per-layer ones) on the router
inputs captured by hooks; the reference model attaches no loss itself (coefficients 0). Also: the
scale is the Trainer's for its step only, and a dense model in the same process is untouched.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.testing import run_distributed
from megatron_core.training import Trainer, TrainingSettings
from megatron_core.transformer.moe.moe_layer import moe_layers
from tests.transformer.moe.moe_harness import (
    BATCH,
    SEQ,
    VOCAB,
    build_moe_gpt,
    is_expert_key,
    local_slice,
    moe_config,
    param_entries,
)

DP, MICRO = 2, 2
AUX, Z = 1e-2, 1e-3


def _batches(seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(DP * MICRO):
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()  # uneven token counts per micro-batch
        out.append({"tokens": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
                    "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).clone()})
    return out


def _by_hand(x: torch.Tensor, weight: torch.Tensor, topk: int) -> torch.Tensor:
    """aux + z of one layer on its router input ``x [T, h]``, from the definitions."""
    logits = x.float() @ weight.float().t()  # [T, E]
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    counts = torch.zeros_like(probs).scatter(1, logits.topk(topk, dim=-1).indices, 1.0).sum(0)  # [E]
    aux = AUX * num_experts / (topk * num_tokens**2) * (probs.sum(0) * counts).sum()
    z = Z * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return aux + z


def _cp_positions(cp: int) -> list[torch.Tensor]:
    """Sequence positions held by each context-parallel rank: chunks ``c`` and ``2cp - 1 - c`` of ``2cp``."""
    chunk = SEQ // (2 * cp)
    return [torch.cat([torch.arange(c * chunk, (c + 1) * chunk),
                       torch.arange((2 * cp - 1 - c) * chunk, (2 * cp - c) * chunk)]) for c in range(cp)]


def _reference(batches: list[dict[str, torch.Tensor]], cp: int = 1) -> dict[str, torch.Tensor]:
    """With CP each rank routes (and balances) its own positions: the aux / z losses are per CP chunk."""
    torch.manual_seed(0)
    model = build_moe_gpt(moe_config(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)).train()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in moe_layers(model):
        layer.router.register_forward_pre_hook(lambda mod, args: captured.append((args[0], mod.weight)))
    total_tokens = sum(b["loss_mask"].sum() for b in batches)
    lm, balance = torch.zeros(()), torch.zeros(())
    for b in batches:
        captured.clear()
        losses = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        lm = lm + (losses.float() * b["loss_mask"]).sum()
        assert len(captured) == 2
        for x, w in captured:  # x: [s * b, h] in [s, b] order
            for positions in _cp_positions(cp):
                balance = balance + _by_hand(x.view(SEQ, BATCH, -1)[positions].reshape(-1, x.shape[-1]), w, 2)
    (lm / total_tokens + balance / (len(batches) * cp)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _trainer_rank(ep: int, grouped: bool, cp: int, batches: list[dict[str, torch.Tensor]], ref_path: str) -> dict:
    expected = torch.load(ref_path, weights_only=True)
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep, context_parallel_size=cp)
    torch.manual_seed(0)
    model = build_moe_gpt(moe_config(ep=ep, moe_aux_loss_coeff=AUX, moe_z_loss_coeff=Z, context_parallel_size=cp),
                          grouped=grouped)
    settings = TrainingSettings(train_iters=1, micro_batch_size=BATCH, grad_accum_steps=MICRO, lr=1e-3,
                                warmup_iters=0, clip_grad=0.0, weight_decay=0.0, progress_bar=False, device="cpu")
    trainer = Trainer(model, settings, [])  # type: ignore[arg-type]
    d = ps.get_data_parallel_rank()
    trainer.train_step(batches[d * MICRO:(d + 1) * MICRO])
    scales = [layer.router.aux_loss_scale for layer in moe_layers(model)]
    # |grad - expected| / (1e-6 + 1e-5 |expected|) per parameter: <= 1 is within tolerance
    errors = {e.key: float(((p.grad - local_slice(expected[e.key], e)).abs()
                            / (1e-6 + 1e-5 * local_slice(expected[e.key], e).abs())).max())
              for p, e in param_entries(model).values()}
    return {"errors": errors, "scales": scales}


@pytest.mark.slow
@pytest.mark.parametrize("ep,grouped,cp", [(1, False, 1), (2, False, 1), (2, True, 1), (2, False, 2), (4, True, 2)])
def test_trainer_gradients_equal_explicit_objective(tmp_path, ep, grouped, cp):
    """cp=2: context x expert parallelism (EP carved out of DP x CP; EP=4 spans both DP ranks)."""
    batches = _batches()
    torch.save(_reference(batches, cp), tmp_path / "ref.pt")
    for rank in run_distributed(_trainer_rank, DP * cp, ep, grouped, cp, batches, str(tmp_path / "ref.pt"),
                                tmp_dir=tmp_path):
        assert rank["scales"] == [1.0, 1.0]  # restored after the step
        bad = {k: v for k, v in rank["errors"].items() if v > 1.0}
        assert not bad, bad
        assert sum(map(is_expert_key, rank["errors"])) == 2 * 2 * 8 // ep  # layers x (fc1, fc2) x local experts


def test_aux_loss_scale_is_per_model_and_per_step():
    from megatron_core.training.moe_metrics import aux_loss_scale

    torch.manual_seed(0)
    model = build_moe_gpt(moe_config())
    other = build_moe_gpt(moe_config())
    with aux_loss_scale(model, 4):
        assert [layer.router.aux_loss_scale for layer in moe_layers(model)] == [0.25, 0.25]
        assert [layer.router.aux_loss_scale for layer in moe_layers(other)] == [1.0, 1.0]
    assert [layer.router.aux_loss_scale for layer in moe_layers(model)] == [1.0, 1.0]
