"""Resuming from a checkpoint continues the exact loss curve (model, AdamW, schedule, RNG, data)."""

import pytest
import torch

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.training import Trainer, TrainingSettings, latest_checkpoint
from specs.gpt import get_gpt_layer_local_spec

N = 6


def _trainer(save_dir, train_iters, tp=1, seed=7, dropout=0.1, fused_adamw=False):
    model_parallel_manual_seed(seed)
    # Dropout on by default, so that a wrong RNG restore would show in the losses.
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=dropout,
                               attention_dropout=dropout, tensor_model_parallel_size=tp)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=16)
    settings = TrainingSettings(train_iters=train_iters, lr_decay_iters=N, micro_batch_size=4, grad_accum_steps=2,
                                lr=3e-3, min_lr=3e-4, warmup_iters=2, clip_grad=0.5, save_dir=str(save_dir),
                                save_interval=0, progress_bar=False, seed=11, fused_adamw=fused_adamw)
    return Trainer(model, settings, AlphabetDataset(1000, 16, seed=0))


def _straight_and_resumed(tmp, tp=1, fused_adamw=False):
    straight = _trainer(f"{tmp}/straight", N, tp, fused_adamw=fused_adamw).train()
    first = _trainer(f"{tmp}/split", N // 2, tp, fused_adamw=fused_adamw).train()
    torch.manual_seed(12345)  # the checkpoint must restore every generator, whatever happened since
    # different init: overwritten by the load
    resumed_trainer = _trainer(f"{tmp}/split", N, tp, seed=99, fused_adamw=fused_adamw)
    assert bool(resumed_trainer.optimizer.defaults.get("fused")) == fused_adamw
    second = resumed_trainer.train()
    return straight, first, second


@pytest.mark.parametrize("fused_adamw", [False, True])
def test_resume_continues_the_same_loss_curve(tmp_path, fused_adamw):
    straight, first, second = _straight_and_resumed(tmp_path, fused_adamw=fused_adamw)
    assert second.start_iteration == N // 2 and second.iteration == N
    assert latest_checkpoint(tmp_path / "split").name == f"iter_{N:07d}"
    resumed = first.losses + second.losses
    assert len(resumed) == N
    assert resumed == pytest.approx(straight.losses, abs=1e-6)
    if fused_adamw:  # torch's fused kernel is deterministic: the resumed run is bit-equal
        assert resumed == straight.losses
    assert straight.losses[-1] < straight.losses[0]


def _tp2_resume(tmp):
    parallel_state.initialize_model_parallel(2)
    straight, first, second = _straight_and_resumed(tmp, tp=2)
    return straight.losses, first.losses + second.losses


def test_resume_at_tp2(tmp_path):
    results = run_distributed(_tp2_resume, 2, str(tmp_path), tmp_dir=tmp_path)
    for straight, resumed in results:
        assert resumed == pytest.approx(straight, abs=1e-6)
    assert results[0][0] == results[1][0]  # both TP ranks see the same loss


def _tp2_first_half(tmp):
    parallel_state.initialize_model_parallel(2)
    return _trainer(f"{tmp}/resharded", N // 2, tp=2, dropout=0.0).train().losses


def test_resume_at_another_tp_size_reshards_model_and_optimizer(tmp_path):
    """Saved at TP=2, resumed at TP=1: AdamW's moments reshard with their parameters."""
    first = run_distributed(_tp2_first_half, 2, str(tmp_path), tmp_dir=tmp_path)[0]
    second = _trainer(tmp_path / "resharded", N, tp=1, seed=99, dropout=0.0).train()
    straight = _trainer(tmp_path / "straight_tp1", N, tp=1, dropout=0.0).train()
    assert second.start_iteration == N // 2
    # Not bit-exact (TP changes the order of float sums), but the same trajectory.
    assert first + second.losses == pytest.approx(straight.losses, abs=1e-5)
