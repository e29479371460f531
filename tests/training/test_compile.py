"""Regional torch.compile (training.compile): the same losses as eager over 10 updates, at TP=1 and TP=2.

The suite compiles with the ``aot_eager`` backend (dynamo + AOTAutograd, no C++ code generation:
inductor takes minutes per graph on this 2-core machine); the wiring, graph capture, graph breaks at
the TP collectives and the autograd of the captured graphs are the same as with inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.testing import run_distributed
from megatron_core.training import Trainer, TrainingSettings
from megatron_core.training.compile import compile_layers
from megatron_core.transformer.transformer_layer import TransformerLayer
from specs.gpt import get_gpt_layer_local_spec
from tests.training.test_loop import SEQ, VOCAB, RandomTokens, _model

TOL = 1e-5


def _settings(compiled: bool) -> TrainingSettings:
    return TrainingSettings(train_iters=10, micro_batch_size=3, lr=3e-3, min_lr=3e-4, warmup_iters=2,
                            progress_bar=False, device="cpu", seed=5, compile=compiled, compile_backend="aot_eager")


@pytest.mark.slow
def test_trainer_compiled_layers_match_eager_over_10_updates():
    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    data = RandomTokens(64)
    eager = Trainer(eager_model, _settings(False), data).train()
    compiled = Trainer(compiled_model, _settings(True), data).train()
    layers = [m for m in compiled_model.modules() if isinstance(m, TransformerLayer)]
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert compiled.losses == pytest.approx(eager.losses, abs=TOL, rel=0)
    assert compiled_model.state_dict().keys() == eager_model.state_dict().keys()  # checkpoint keys unchanged


def test_compile_layers_refuses_a_model_without_layers():
    with pytest.raises(ValueError, match="no TransformerLayer"):
        compile_layers(torch.nn.Linear(2, 2))


def _tp2_losses(compiled: bool) -> list[float]:
    ps.initialize_model_parallel(2)
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, tensor_model_parallel_size=2, sequence_parallel=True)
    model = GPTModel(config, get_gpt_layer_local_spec(), VOCAB, SEQ)
    if compiled:
        compile_layers(model, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(10):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        optimizer.zero_grad()
        loss = model(ids, torch.arange(SEQ).expand(2, SEQ), None, labels=ids.roll(-1, 1)).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_layers_at_tp2_graph_break_at_collectives(tmp_path):
    eager = run_distributed(_tp2_losses, 2, False, tmp_dir=tmp_path)
    compiled = run_distributed(_tp2_losses, 2, True, tmp_dir=tmp_path)
    for e, c in zip(eager, compiled, strict=True):
        assert c == pytest.approx(e, abs=TOL, rel=0)
