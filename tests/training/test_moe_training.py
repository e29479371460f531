"""MoE through the training entry point: aux/z losses and per-expert token counts in metrics.jsonl,
EP=2 training equal to EP=1 (expert gradients summed over expert-DP, norms over EP), and the shipped
``examples/moe_gpt.yaml`` solving the alphabet task (>= 99% next-letter accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_core.testing import run_distributed
from megatron_core.train import main

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "moe_gpt.yaml"


def _args(tmp_path: Path, iters: int, *extra: str) -> list[str]:
    args = ["--config", str(CONFIG), "--set", f"training.train_iters={iters}", "--set", "training.warmup_iters=2",
            "--set", "training.micro_batch_size=8", "--set", "training.eval_interval=0",
            "--set", "training.save_interval=0", "--set", f"training.save_dir={tmp_path / 'ckpt'}",
            "--set", f"training.metrics_file={tmp_path / 'm.jsonl'}", "--set", "training.progress_bar=false",
            "--set", "data.seq_length=16", "--set", "training.log_interval=1"]
    for item in extra:
        args += ["--set", item]
    return args


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]


def _train(tmp: str, iters: int, extra: list[str]) -> list[float]:
    return main(_args(Path(tmp), iters, *extra)).losses


def test_moe_metrics_are_logged(tmp_path):
    main(_args(tmp_path, 2))
    records = [r for r in _records(tmp_path) if "loss" in r]
    assert len(records) == 2
    for r in records:
        assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
        # every layer routes 8 x 16 tokens to 2 experts each (dropless)
        assert sorted(r["moe_tokens_per_expert"]) == ["1", "2"]
        assert all(sum(counts) == 8 * 16 * 2 and len(counts) == 8 for counts in r["moe_tokens_per_expert"].values())


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_expert_parallel_training_matches_data_parallel(tmp_path, dispatcher):
    """Two ranks, 3 steps: EP=2 (experts split) gives EP=1's (experts replicated) losses and metrics."""
    common = [f"transformer.moe_token_dispatcher_type={dispatcher}", "training.clip_grad=0.05"]  # clipping active
    dense = run_distributed(_train, 2, str(tmp_path / "ep1"), 3, common, tmp_dir=tmp_path)
    (tmp_path / "ep2").mkdir()
    split = run_distributed(_train, 2, str(tmp_path / "ep2"), 3, common + ["parallel.expert_model_parallel_size=2"],
                            tmp_dir=tmp_path)
    assert dense[0] == pytest.approx(split[0], rel=1e-5, abs=1e-6)
    ep1 = [r for r in _records(tmp_path / "ep1") if "loss" in r]
    ep2 = [r for r in _records(tmp_path / "ep2") if "loss" in r]
    for a, b in zip(ep1, ep2, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["moe_tokens_per_expert"] == b["moe_tokens_per_expert"]
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~30 s alone; minutes when the machine is shared
def test_moe_example_learns_the_alphabet(tmp_path):
    from megatron_core.data.alphabet import AlphabetTokenizer
    from megatron_core.demo import next_letter_accuracy
    from megatron_core.training.run_config import model_from_checkpoint

    args = _args(tmp_path, 60, "training.micro_batch_size=16", "training.save_interval=60",
                 "training.lr_decay_iters=60", "training.warmup_iters=5")
    main(args)
    loaded = model_from_checkpoint(tmp_path / "ckpt")
    accuracy = next_letter_accuracy(loaded.model.eval(), AlphabetTokenizer(), 16, num_sequences=256)
    assert accuracy >= 0.99, accuracy


@pytest.mark.slow
def test_sequence_parallel_moe_training_matches_without(tmp_path):
    """TP=2 x EP=2 on 4 ranks, 3 steps: with sequence parallelism the same losses as without."""
    common = ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2"]
    plain = run_distributed(_train, 4, str(tmp_path / "plain"), 3, common, tmp_dir=tmp_path)
    (tmp_path / "sp").mkdir()
    sp = run_distributed(_train, 4, str(tmp_path / "sp"), 3, common + ["transformer.sequence_parallel=true"],
                         tmp_dir=tmp_path)
    assert sp[0] == pytest.approx(plain[0], rel=1e-5, abs=1e-6)
    assert all(losses == sp[0] for losses in sp)
