"""The Trainer's FP8 plumbing, with the CPU stand-in of TE's API (``tests/extensions/fake_te``).

Stand-in TE (CPU). Verifies: every micro-batch's forward (train and eval) runs inside
``fp8_autocast`` exactly when the model config sets ``fp8``, the backward and the optimizer step
outside it; the losses equal the non-FP8 run (the stand-in does not quantise); the FP8 state in
``_extra_state`` survives a Trainer checkpoint and resume; a local-spec model is refused. Does
not verify FP8 numerics, speed, or real Transformer Engine on a GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from megatron_core.extensions import te_fp8
from megatron_core.training import Trainer, TrainingSettings
from tests.extensions._fake_te import fake_te
from tests.extensions._te_models import build
from tests.training.test_loop import RandomTokens

ITERS, ACCUM = 2, 2


@pytest.fixture
def fp8_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with fake_te():
        monkeypatch.setattr(te_fp8, "FP8_DEVICE_TYPES", ("cuda", "cpu"))  # the stand-in runs on CPU
        state = importlib.import_module("transformer_engine.pytorch.fp8")
        state.ENTERED.clear()
        yield state


def _settings(**overrides: Any) -> TrainingSettings:
    fields: dict[str, Any] = dict(train_iters=ITERS, grad_accum_steps=ACCUM, micro_batch_size=2, lr=3e-3,
                                  min_lr=3e-4, warmup_iters=1, progress_bar=False, device="cpu", eval_iters=1)
    fields.update(overrides)
    return TrainingSettings(**fields)


def _te_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith(("linear_qkv", "linear_proj", "linear_fc1",
                                                                     "linear_fc2"))]


def _spy(trainer: Trainer, manager: Any) -> tuple[list[bool], list[bool]]:
    """Record whether FP8 autocast is on during each TE linear's backward and each optimizer step."""
    backward, optimizer = [], []
    for linear in _te_linears(trainer.model):
        linear.register_full_backward_hook(lambda *_: backward.append(manager.is_fp8_enabled()))
    step = trainer.optimizer.step

    def spied_step(*args: Any, **kwargs: Any) -> Any:
        optimizer.append(manager.is_fp8_enabled())
        return step(*args, **kwargs)

    trainer.optimizer.step = spied_step  # type: ignore[method-assign]
    return backward, optimizer


def test_forward_runs_in_fp8_autocast_and_backward_and_optimizer_outside(fp8_state: ModuleType) -> None:
    model = build("gpt", "te", seed=0, fp8="hybrid", fp8_amax_history_len=8)
    trainer = Trainer(model, _settings(), RandomTokens(32), valid_data=RandomTokens(8, seed=1))
    backward, optimizer = _spy(trainer, fp8_state.FP8GlobalStateManager)
    fp8_losses = trainer.train().losses

    forwards = ITERS * ACCUM + 1  # the training micro-batches and the final evaluation's one
    assert len(fp8_state.ENTERED) == forwards
    for entry in fp8_state.ENTERED:
        assert entry.enabled and type(entry.recipe).__name__ == "DelayedScaling"
        assert entry.recipe.amax_history_len == 8 and entry.group is None  # single process: no amax group
    assert all(linear.fp8_meta["forwards"] == forwards for linear in _te_linears(model))
    assert len(backward) == ITERS * ACCUM * 8 and not any(backward)  # 8 TE linears, every backward outside
    assert optimizer == [False] * ITERS

    fp8_state.ENTERED.clear()
    plain = build("gpt", "te", seed=0)
    plain_losses = Trainer(plain, _settings(), RandomTokens(32), valid_data=RandomTokens(8, seed=1)).train().losses
    assert fp8_state.ENTERED == []  # fp8 unset: never entered
    assert plain_losses == fp8_losses  # the stand-in does not quantise: the same run otherwise


def test_fp8_state_survives_trainer_checkpoint_and_resume(fp8_state: ModuleType, tmp_path: Path) -> None:
    settings = _settings(save_dir=str(tmp_path), train_iters=1)
    model = build("gpt", "te", seed=0, fp8="e4m3")
    Trainer(model, settings, RandomTokens(32)).train()
    saved = [linear.fp8_meta for linear in _te_linears(model)]
    assert all(meta is not None and meta["forwards"] == ACCUM for meta in saved)

    fresh = build("gpt", "te", seed=1, fp8="e4m3")
    assert Trainer(fresh, settings, RandomTokens(32)).resume() is not None
    assert [linear.fp8_meta for linear in _te_linears(fresh)] == saved


def test_trainer_refuses_fp8_on_a_local_spec_model(fp8_state: ModuleType) -> None:
    model = build("gpt", "local", seed=0, fp8="hybrid")
    with pytest.raises(ValueError, match="get_gpt_layer_te_spec"):
        Trainer(model, _settings(), RandomTokens(32))


def test_fp8_run_starts_from_a_checkpoint_saved_without_fp8(fp8_state: ModuleType, tmp_path: Path) -> None:
    settings = _settings(save_dir=str(tmp_path), train_iters=1)
    plain = build("gpt", "te", seed=0)
    Trainer(plain, settings, RandomTokens(32)).train()
    fp8_model = build("gpt", "te", seed=1, fp8="hybrid")
    Trainer(fp8_model, settings, RandomTokens(32)).resume()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(fp8_model.state_dict()[name], tensor), name
    assert all(linear.fp8_meta is None for linear in _te_linears(fp8_model))  # fresh FP8 state
