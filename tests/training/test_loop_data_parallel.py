"""Two data-parallel replicas with micro-batch 2 train exactly like one process with micro-batch 4."""

import pytest

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.training import Trainer, TrainingSettings
from specs.gpt import get_gpt_layer_local_spec


def _losses(micro_batch_size):
    model_parallel_manual_seed(1)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=16)
    settings = TrainingSettings(train_iters=4, micro_batch_size=micro_batch_size, grad_accum_steps=2, lr=3e-3,
                                warmup_iters=1, progress_bar=False)
    return Trainer(model, settings, AlphabetDataset(500, 16, seed=0)).train().losses


def _dp2():
    parallel_state.initialize_model_parallel(1)
    assert parallel_state.get_data_parallel_world_size() == 2
    return _losses(2)


def test_data_parallel_matches_single_process(tmp_path):
    reference = _losses(4)
    for losses in run_distributed(_dp2, 2, tmp_dir=tmp_path):
        assert losses == pytest.approx(reference, rel=1e-5)
