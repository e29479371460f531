"""The Trainer under pipeline parallelism and the distributed optimizer, against a single process.

Every layout starts from the same full weights (copied into each rank's shards by checkpoint key),
so loss curves and gradient norms can be compared step by step. Gradient clipping is set low
enough to trigger on every step: the global norm must count the tied embedding once and be reduced
across stages and TP ranks, or the clipped updates (and so the losses) would drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset
from megatron_core.models.gpt import GPTModel
from megatron_core.optimizer import DistributedOptimizer
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.training import (
    ModelChunks,
    Trainer,
    TrainingSettings,
    build_model_chunks,
    latest_checkpoint,
)
from specs.gpt import get_gpt_layer_local_spec

N = 6
VOCAB, SEQ = 32, 16
CLIP = 0.05  # far below the ~1 gradient norms of this model: every step clips


def _model(tp: int = 1, pp: int = 1, dropout: float = 0.0, seed: int = 0) -> GPTModel:
    model_parallel_manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, hidden_dropout=dropout,
                               attention_dropout=dropout, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


def _full_weights() -> dict[str, torch.Tensor]:
    full = _model().state_dict()
    return {k: v.clone() for k, v in full.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


FULL = _full_weights()


def _stage(tp: int = 1, pp: int = 1, dropout: float = 0.0) -> GPTModel:
    """This rank's stage holding its slices of FULL (the last stage's tied copy included)."""
    stage = _model(tp, pp, dropout, seed=99)
    with torch.no_grad():
        for sh in stage.sharded_state_dict().values():
            sh.data.copy_(FULL[sh.key][sh.global_slice()].reshape(sh.local_shape))
    return stage


def _settings(tmp: str | Path, name: str, train_iters: int = N, **overrides: Any) -> TrainingSettings:
    values: dict[str, Any] = dict(
        train_iters=train_iters, lr_decay_iters=N, micro_batch_size=2, grad_accum_steps=4, lr=3e-3, min_lr=3e-4,
        warmup_iters=2, clip_grad=CLIP, save_dir=f"{tmp}/{name}", save_interval=N // 2, eval_interval=N // 2,
        eval_iters=2, metrics_file=f"{tmp}/{name}.jsonl", progress_bar=False, seed=5)
    values.update(overrides)
    return TrainingSettings(**values)


def _trainer(stage: torch.nn.Module, settings: TrainingSettings) -> Trainer:
    return Trainer(stage, settings, AlphabetDataset(1000, SEQ, seed=0), AlphabetDataset(64, SEQ, seed=1))


def _grad_norms(metrics: str | Path) -> list[float]:
    return [r["grad_norm"] for r in map(json.loads, Path(metrics).read_text().splitlines()) if "grad_norm" in r]


# ---------------------------------------------------------------------------- TP2 x PP2 == one process
def _tp2_pp2(tmp: str) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(2, 2)
    result = _trainer(_stage(2, 2), _settings(tmp, "tp2pp2")).train()
    return {"losses": result.losses, "valid": result.valid_losses, "rank": dist.get_rank()}


def _single(tmp: str | Path, name: str, **overrides: Any) -> Any:
    return _trainer(_stage(), _settings(tmp, name, **overrides)).train()


@pytest.fixture(scope="module")
def tp2_pp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("pipeline_trainer")
    return tmp, run_distributed(_tp2_pp2, 4, str(tmp), tmp_dir=tmp)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    tmp = tmp_path_factory.mktemp("single")
    return tmp, _single(tmp, "single")


def test_trainer_at_tp2_pp2_matches_one_process_with_clipping(tp2_pp2_run, single_run):
    tmp, per_rank = tp2_pp2_run
    ref_tmp, reference = single_run
    for rank in per_rank:  # every rank reports the last stage's loss
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(reference.losses), atol=1e-5, rtol=0)
        assert [it for it, _ in rank["valid"]] == [N // 2, N]
        torch.testing.assert_close(torch.tensor([v for _, v in rank["valid"]]),
                                   torch.tensor([v for _, v in reference.valid_losses]), atol=1e-5, rtol=0)
    norms, ref_norms = _grad_norms(tmp / "tp2pp2.jsonl"), _grad_norms(ref_tmp / "single.jsonl")
    assert min(ref_norms) > 10 * CLIP, "the clip threshold must trigger"
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    assert reference.losses[-1] < reference.losses[0]


def test_checkpoint_from_tp2_pp2_resumes_in_one_process(tp2_pp2_run):
    """Model, AdamW moments, schedule and data position saved at (2, 2, 1) continue at (1, 1, 1)."""
    tmp, per_rank = tp2_pp2_run
    trainer = _trainer(_stage(), _settings(tmp, "resumed_tp1", resume=False))
    trainer.resume(tmp / "tp2pp2" / f"iter_{N // 2:07d}")
    assert trainer.iteration == N // 2
    resumed = trainer.train()
    # Not bit-exact: TP=2 and the pipeline split sum some reductions in another order.
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(per_rank[0]["losses"][N // 2:]),
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- interleaved: PP2 x VPP2 x DP2
def _vpp(tmp: str, tp: int) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(tp, 2, virtual_pipeline_model_parallel_size=2)
    chunks = build_model_chunks(lambda: _stage(tp, 2))
    # At TP=1 micro_batch_size 1 on each of 2 replicas: the same samples per micro-batch as 2 in one process.
    trainer = _trainer(chunks, _settings(tmp, "vpp", micro_batch_size=1 if tp == 1 else 2, distributed_optimizer=True,
                                         overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=3000))
    assert isinstance(trainer.model, ModelChunks) and isinstance(trainer.optimizer, DistributedOptimizer)
    result = trainer.train()
    layers = sorted(chunk.decoder.layer_offset for chunk in chunks)  # type: ignore[union-attr]
    return {"losses": result.losses, "valid": result.valid_losses, "layers": layers}


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2-vpp2-dp2", "tp2-pp2-vpp2"])
def test_trainer_with_interleaved_pipeline_matches_one_process_and_resumes_at_pp1(tmp_path, single_run, tp):
    """PP=2 x VPP=2 (4 layers, one per chunk) x DP=2 (or x TP=2) with the distributed optimizer: the
    one-process curve; its checkpoint (global layer keys, moments keyed by parameter) continues it at PP=1."""
    per_rank = run_distributed(_vpp, 4, str(tmp_path), tp, tmp_dir=tmp_path)
    ref_tmp, reference = single_run
    tol = 1e-6 if tp == 1 else 1e-5  # TP=2 sums some products in another order (as the TP2 x PP2 test)
    assert [r["layers"] for r in per_rank] == [[0, 2], [0, 2], [1, 3], [1, 3]]  # rank = (dp or tp) + 2 * pp
    for rank in per_rank:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(reference.losses), atol=tol, rtol=0)
        torch.testing.assert_close(torch.tensor([v for _, v in rank["valid"]]),
                                   torch.tensor([v for _, v in reference.valid_losses]), atol=tol, rtol=0)
    torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path / "vpp.jsonl")),
                               torch.tensor(_grad_norms(ref_tmp / "single.jsonl")), rtol=1e-5, atol=0)
    trainer = _trainer(_model(seed=3), _settings(tmp_path, "vpp_to_pp1", resume=False))
    trainer.resume(tmp_path / "vpp" / f"iter_{N // 2:07d}")
    resumed = trainer.train()
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(per_rank[0]["losses"][N // 2:]),
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- resume at PP2
def _plain_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses.sum(), batch["loss_mask"].sum()


def _pp2_resume(tmp: str) -> tuple[list[float], list[float], str]:
    parallel_state.initialize_model_parallel(1, 2)
    with pytest.raises(TypeError, match="StagedStep") as error:  # a plain step cannot be split between stages
        Trainer(_stage(1, 2), TrainingSettings(progress_bar=False), AlphabetDataset(8, SEQ), forward_step=_plain_step)
    # Dropout on: a wrong RNG restore on either stage would show in the losses.
    straight = _trainer(_stage(1, 2, dropout=0.1), _settings(tmp, "straight")).train()
    first = _trainer(_stage(1, 2, dropout=0.1), _settings(tmp, "split", N // 2)).train()
    torch.manual_seed(12345)  # whatever happened since, the checkpoint restores every generator
    second = _trainer(_model(1, 2, dropout=0.1, seed=3), _settings(tmp, "split")).train()
    assert second.start_iteration == N // 2
    return straight.losses, first.losses + second.losses, str(error.value)


def test_resume_at_pp2_continues_the_same_loss_curve(tmp_path):
    for straight, resumed, error in run_distributed(_pp2_resume, 2, str(tmp_path), tmp_dir=tmp_path):
        assert "forward_step=StagedStep(forward=..., loss=...)" in error
        assert len(resumed) == N
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), atol=1e-6, rtol=0)
    assert latest_checkpoint(tmp_path / "split").name == f"iter_{N:07d}"


# ---------------------------------------------------------------------------- distributed optimizer
def _zero_dp2(tmp: str) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(1, 1)
    plain = _trainer(_stage(), _settings(tmp, "plain", micro_batch_size=1)).train()
    # training.zero is kept as an alias of training.distributed_optimizer
    straight_trainer = _trainer(_stage(), _settings(tmp, "zero", micro_batch_size=1, zero=True))
    optimizer = straight_trainer.optimizer
    assert isinstance(optimizer, DistributedOptimizer)
    straight = straight_trainer.train()
    first = _trainer(_stage(), _settings(tmp, "zero_split", N // 2, micro_batch_size=1, distributed_optimizer=True,
                                         overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=2000)
                     ).train()
    second = _trainer(_model(seed=3), _settings(tmp, "zero_split", micro_batch_size=1, distributed_optimizer=True)
                      ).train()
    return {"plain": plain.losses, "zero": straight.losses, "resumed": first.losses + second.losses,
            "owned": optimizer.state_bytes(),
            "total": 8 * sum(p.numel() for p in straight_trainer.model.parameters())}  # two fp32 moments


def test_distributed_optimizer_at_dp2_equals_plain_adamw_and_resumes(tmp_path):
    per_rank = run_distributed(_zero_dp2, 2, str(tmp_path), tmp_dir=tmp_path)
    for rank in per_rank:
        torch.testing.assert_close(torch.tensor(rank["zero"]), torch.tensor(rank["plain"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(rank["resumed"]), torch.tensor(rank["zero"]), atol=1e-6, rtol=0)
        assert 0 < rank["owned"] < rank["total"], "each data-parallel rank holds part of AdamW's state"
    assert per_rank[0]["total"] <= sum(r["owned"] for r in per_rank) < per_rank[0]["total"] * 1.01


def _fused_dp2(tmp: str) -> dict[str, Any]:
    parallel_state.initialize_model_parallel(1, 1)
    plain = _trainer(_stage(), _settings(tmp, "plain_fused", micro_batch_size=1, fused_adamw=True)).train()
    straight_trainer = _trainer(_stage(), _settings(tmp, "dist_fused", micro_batch_size=1, fused_adamw=True,
                                                    distributed_optimizer=True))
    fused = bool(straight_trainer.optimizer.defaults.get("fused"))
    straight = straight_trainer.train()
    first = _trainer(_stage(), _settings(tmp, "dist_fused_split", N // 2, micro_batch_size=1, fused_adamw=True,
                                         distributed_optimizer=True)).train()
    second = _trainer(_model(seed=3), _settings(tmp, "dist_fused_split", micro_batch_size=1, fused_adamw=True,
                                                distributed_optimizer=True)).train()
    return {"plain": plain.losses, "dist": straight.losses, "resumed": first.losses + second.losses, "fused": fused}


def test_distributed_optimizer_with_fused_adamw_equals_plain_fused_adamw_and_resumes(tmp_path):
    """training.fused_adamw with the distributed optimizer: torch's fused kernel on the master shards."""
    per_rank = run_distributed(_fused_dp2, 2, str(tmp_path), tmp_dir=tmp_path)
    for rank in per_rank:
        assert rank["fused"], "the distributed optimizer must run torch's fused AdamW"
        torch.testing.assert_close(torch.tensor(rank["dist"]), torch.tensor(rank["plain"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(rank["resumed"]), torch.tensor(rank["dist"]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- the entry point
def _entry_point_pp2(tmp: str, vpp: int | None) -> tuple[list[float], list[float], bool]:
    from megatron_core.train import main

    config = Path(__file__).resolve().parents[2] / "examples" / "alphabet_gpt.yaml"
    args = ["--config", str(config), "--set", "parallel.pipeline_model_parallel_size=2",
            "--set", "training.lr_decay_iters=4", "--set", "training.warmup_iters=1", "--set", "training.eval_iters=1",
            "--set", "training.micro_batch_size=4", "--set", "training.grad_accum_steps=2",
            "--set", "training.save_interval=2", "--set", f"training.save_dir={tmp}/ckpt",
            "--set", "training.metrics_file=null", "--set", "training.progress_bar=false", "--set", "data.seq_length=16"]
    if vpp is not None:  # interleaved 1F1B: 4 layers, one per chunk
        args += ["--set", f"parallel.virtual_pipeline_model_parallel_size={vpp}", "--set", "transformer.num_layers=4",
                 "--set", "training.eval_iters=2"]  # every schedule call: a multiple of PP micro-batches
    first = main([*args, "--set", "training.train_iters=2"])
    second = main([*args, "--set", "training.train_iters=4"])
    straight = main([*args, "--set", "training.train_iters=4", "--set", f"training.save_dir={tmp}/straight"])
    assert second.start_iteration == 2
    return first.losses + second.losses, straight.losses, parallel_state.model_parallel_is_initialized()


@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2", "pp2-vpp2"])
def test_train_entry_point_at_pp2_saves_and_resumes(tmp_path, vpp):
    for resumed, straight, left_initialised in run_distributed(_entry_point_pp2, 2, str(tmp_path), vpp,
                                                               tmp_dir=tmp_path):
        assert resumed == straight and len(straight) == 4
        assert not left_initialised


def test_chunk_list_must_match_the_virtual_pipeline_size():
    with pytest.raises(ValueError, match="2 model chunk.*virtual_pipeline_model_parallel_size=None"):
        Trainer([_model(), _model()], TrainingSettings(progress_bar=False), AlphabetDataset(8, SEQ))


def test_virtual_pipeline_needs_pipeline_parallelism_in_the_run_config():
    from megatron_core.training.run_config import ParallelSection

    with pytest.raises(ValueError, match="pipeline_model_parallel_size >= 2"):
        ParallelSection(virtual_pipeline_model_parallel_size=2)


def test_interleaved_run_config_needs_micro_batches_in_multiples_of_pp():
    from megatron_core.training.run_config import RunConfig

    parallel = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
    with pytest.raises(ValueError, match="grad_accum_steps=1 must be a multiple of parallel.pipeline_model_parallel_size=2"):
        RunConfig(transformer={}, parallel=parallel, training={"grad_accum_steps": 1})
    assert RunConfig(transformer={}, parallel=parallel, training={"grad_accum_steps": 4}).training.grad_accum_steps == 4
