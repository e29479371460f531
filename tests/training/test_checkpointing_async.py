"""training.async_save and training.keep_last_n: same checkpoints as synchronous saves, retention
only after a newer commit, never the checkpoint a run resumed from."""

import pytest
import torch

from megatron_core import TransformerConfig
from megatron_core import dist_checkpointing as dc
from megatron_core.data import AlphabetDataset
from megatron_core.dist_checkpointing import background
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.training import Trainer, TrainingSettings, latest_checkpoint


def _trainer(save_dir, train_iters, **settings):
    model_parallel_manual_seed(7)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.1,
                               attention_dropout=0.1)
    from specs.gpt import get_gpt_layer_local_spec

    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=16)
    s = TrainingSettings(train_iters=train_iters, lr_decay_iters=8, micro_batch_size=4, lr=3e-3, min_lr=3e-4,
                         warmup_iters=2, save_dir=str(save_dir), save_interval=2, progress_bar=False, seed=11,
                         **settings)
    return Trainer(model, s, AlphabetDataset(1000, 16, seed=0))


def _iters(save_dir):
    return sorted(p.name for p in save_dir.iterdir())


@pytest.mark.slow
def test_async_save_and_keep_last_n(tmp_path):
    sync = _trainer(tmp_path / "sync", 8).train()
    run = _trainer(tmp_path / "async", 6, async_save=True, keep_last_n=2).train()
    assert run.losses == sync.losses[:6]  # saving in the background changes nothing in training
    assert not background._free_buffers  # the snapshot buffers reused between saves are freed at the end
    assert _iters(tmp_path / "async") == ["iter_0000004", "iter_0000006"]  # iter 2 deleted after 6 committed
    assert _iters(tmp_path / "sync") == ["iter_0000002", "iter_0000004", "iter_0000006", "iter_0000008"]
    for it in ("iter_0000004", "iter_0000006"):  # bit-identical to what a synchronous save wrote
        want = dc.load_plain_tensors(tmp_path / "sync" / it)
        got = dc.load_plain_tensors(tmp_path / "async" / it)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), it
    # resume with keep_last_n=1: the checkpoint resumed from is never deleted, older ones are
    resumed = _trainer(tmp_path / "async", 8, async_save=True, keep_last_n=1).train()
    assert resumed.start_iteration == 6
    assert _iters(tmp_path / "async") == ["iter_0000006", "iter_0000008"]
    assert latest_checkpoint(tmp_path / "async").name == "iter_0000008"
    assert run.losses + resumed.losses == sync.losses
