"""The Trainer under context parallelism against a single process: loss curves, resume across CP sizes, PP2 x CP2.

CP does not shard weights: every CP rank builds the same model from the same seed, reads the same
micro-batches and keeps its load-balanced chunks of each sequence. Token counts, loss sums and
gradients add up over the data x context parallel ranks, so the curve equals the single-process one.
Clipping is low enough to act on every step (the norm must be that of the full gradient).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset
from megatron_core.models.gpt import GPTModel
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.training import StagedStep, Trainer, TrainingSettings
from megatron_core.training.steps import language_model_forward, masked_token_loss
from specs.gpt import get_gpt_layer_local_spec

N = 10
VOCAB, SEQ = 32, 16


def _model(cp: int = 1, pp: int = 1) -> GPTModel:
    model_parallel_manual_seed(0 + 100 * parallel_state.get_pipeline_model_parallel_rank())
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               hidden_dropout=0.0, attention_dropout=0.0, context_parallel_size=cp,
                               pipeline_model_parallel_size=pp)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


def _settings(tmp: str | Path, name: str, train_iters: int = N, **overrides: Any) -> TrainingSettings:
    values: dict[str, Any] = dict(
        train_iters=train_iters, lr_decay_iters=N, micro_batch_size=2, grad_accum_steps=2, lr=3e-3, min_lr=3e-4,
        warmup_iters=2, clip_grad=0.05, save_dir=f"{tmp}/{name}", save_interval=N // 2, eval_interval=N // 2,
        eval_iters=2, metrics_file=f"{tmp}/{name}.jsonl", progress_bar=False, seed=5)
    values.update(overrides)
    return TrainingSettings(**values)


def _cp_run(cp: int, tmp: str, name: str, resume_from: str | None = None, train_iters: int = N) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model = _model(cp)
    settings = _settings(tmp, name, train_iters, metrics_file=None)
    trainer = Trainer(model, settings, AlphabetDataset(1000, SEQ, seed=0), AlphabetDataset(64, SEQ, seed=1))
    if resume_from is not None:
        trainer.resume(resume_from)
    result = trainer.train()
    return {"losses": result.losses, "valid": result.valid_losses}


def test_cp2_trainer_equals_single_process_and_resumes_across_cp_sizes(tmp_path):
    single = _cp_run(1, str(tmp_path), "cp1")
    cp2 = run_distributed(_cp_run, 2, 2, str(tmp_path), "cp2", tmp_dir=tmp_path)
    for rank in range(2):
        torch.testing.assert_close(cp2[rank]["losses"], single["losses"], rtol=1e-5, atol=1e-6)
        assert [i for i, _ in cp2[rank]["valid"]] == [i for i, _ in single["valid"]]
        torch.testing.assert_close([v for _, v in cp2[rank]["valid"]], [v for _, v in single["valid"]], rtol=1e-5,
                                   atol=1e-6)
    assert single["losses"][-1] < single["losses"][0]
    # The mid-run checkpoints (iteration N/2) resume at the other CP size on the same curve.
    half = N // 2
    saved_cp2 = str(tmp_path / "cp2" / f"iter_{half:07d}")
    saved_cp1 = str(tmp_path / "cp1" / f"iter_{half:07d}")
    assert Path(saved_cp2).is_dir() and Path(saved_cp1).is_dir(), sorted(p.name for p in (tmp_path / "cp2").iterdir())
    parallel_state.destroy_model_parallel()
    at_cp1 = _cp_run(1, str(tmp_path), "cp2to1", resume_from=saved_cp2)
    torch.testing.assert_close(at_cp1["losses"], single["losses"][half:], rtol=1e-5, atol=1e-6)
    at_cp2 = run_distributed(_cp_run, 2, 2, str(tmp_path), "cp1to2", saved_cp1, tmp_dir=tmp_path)
    torch.testing.assert_close(at_cp2[0]["losses"], single["losses"][half:], rtol=1e-5, atol=1e-6)


def _pp2_cp2(tmp: str, full: dict[str, torch.Tensor]) -> list[float]:
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, context_parallel_size=2)
    stage = _model(2, 2)
    with torch.no_grad():  # the single process's weights, by checkpoint key (stages draw their own)
        for sh in stage.sharded_state_dict().values():
            sh.data.copy_(full[sh.key][sh.global_slice()].reshape(sh.local_shape))
    step = StagedStep(language_model_forward, masked_token_loss)
    settings = _settings(tmp, "pp2cp2", 4, metrics_file=None, save_dir=None, eval_interval=0)
    return Trainer(stage, settings, AlphabetDataset(1000, SEQ, seed=0), forward_step=step).train().losses


@pytest.mark.slow
def test_pp2_x_cp2_trainer_equals_single_process(tmp_path):
    parallel_state.initialize_model_parallel()
    model = _model()
    full = {k: v.clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    settings = _settings(tmp_path, "single", 4, metrics_file=None, save_dir=None, eval_interval=0)
    single = Trainer(model, settings, AlphabetDataset(1000, SEQ, seed=0)).train().losses
    parallel_state.destroy_model_parallel()
    for losses in run_distributed(_pp2_cp2, 4, str(tmp_path), full, tmp_dir=tmp_path):
        torch.testing.assert_close(losses, single, rtol=1e-5, atol=1e-6)


def _cp2_dp2_distributed_optimizer(tmp: str) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(context_parallel_size=2)  # 4 ranks: CP = 2 x DP = 2
    # micro_batch_size 1 on each of 2 replicas: the same samples per micro-batch as 2 in one process.
    settings = _settings(tmp, "cp2dp2", metrics_file=None, micro_batch_size=1, distributed_optimizer=True,
                         overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=2000)
    trainer = Trainer(_model(2), settings, AlphabetDataset(1000, SEQ, seed=0), AlphabetDataset(64, SEQ, seed=1))
    assert isinstance(trainer.optimizer, DistributedOptimizer)
    owned = trainer.optimizer.state_bytes()
    result = trainer.train()
    total = 8 * sum(p.numel() for p in trainer.model.parameters())  # two fp32 moments, unsharded
    return {"losses": result.losses, "owned": owned, "total": total}


@pytest.mark.slow  # ~30 s: 10 steps on 4 processes, 10 + 5 in this one
def test_distributed_optimizer_at_cp2_x_dp2_equals_single_process_and_resumes_at_cp1(tmp_path):
    """The distributed optimizer shards over the 4 data x context parallel ranks (where gradients reduce);
    its checkpoint (each parameter's moments written once) continues in one process with plain AdamW."""
    per_rank = run_distributed(_cp2_dp2_distributed_optimizer, 4, str(tmp_path), tmp_dir=tmp_path)
    single = _cp_run(1, str(tmp_path), "cp1")
    for rank in per_rank:
        torch.testing.assert_close(rank["losses"], single["losses"], rtol=1e-5, atol=1e-6)
        assert rank["total"] / 4 <= rank["owned"] < rank["total"] / 4 * 1.01, "1/(DP x CP) of AdamW's state"
    half = N // 2
    parallel_state.destroy_model_parallel()
    resumed = _cp_run(1, str(tmp_path), "cp2dp2to1", resume_from=str(tmp_path / "cp2dp2" / f"iter_{half:07d}"))
    torch.testing.assert_close(resumed["losses"], per_rank[0]["losses"][half:], rtol=1e-5, atol=1e-6)


def _entry_point(args: list[str]) -> list[float]:
    from megatron_core.train import main

    return main(args).losses


def test_train_entry_point_at_cp2_trains_like_one_process(tmp_path):
    from megatron_core.train import main

    config = Path(__file__).resolve().parents[2] / "examples" / "alphabet_gpt.yaml"
    args = ["--config", str(config), "--set", "training.train_iters=3", "--set", "training.lr_decay_iters=3",
            "--set", "training.warmup_iters=1", "--set", "training.micro_batch_size=4", "--set", "data.seq_length=16",
            "--set", "training.eval_interval=0", "--set", "training.save_dir=null", "--set", "training.metrics_file=null",
            "--set", "training.progress_bar=false"]
    one = main(args).losses
    parallel_state.destroy_model_parallel()
    two = run_distributed(_entry_point, 2, [*args, "--set", "parallel.context_parallel_size=2"], tmp_dir=tmp_path)
    assert len(one) == 3
    for losses in two:
        assert losses == pytest.approx(one, abs=1e-5)
