"""A checkpoint the Trainer wrote at TP=2 -> export-hf -> transformers' from_pretrained gives our logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.interop.__main__ import main
from megatron_core.testing import run_distributed
from megatron_core.training import latest_checkpoint
from megatron_core.training.run_config import RunConfig, model_from_checkpoint

transformers = pytest.importorskip("transformers")
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "alphabet_gpt.yaml"


def _train_tp2(save_dir: str) -> None:
    from megatron_core.train import run_training

    run = RunConfig.from_yaml(CONFIG, [
        "parallel.tensor_model_parallel_size=2", "training.train_iters=3", "training.warmup_iters=1",
        "training.micro_batch_size=2", "training.eval_iters=1", "training.progress_bar=false",
        f"training.save_dir={save_dir}", "training.device=cpu", "data.seq_length=16"])
    run_training(run)


@pytest.mark.slow
def test_trainer_checkpoint_exports_to_transformers(tmp_path):
    run_distributed(_train_tp2, 2, str(tmp_path / "run"), tmp_dir=tmp_path)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert main(["export-hf", str(checkpoint), str(tmp_path / "hf")]) == 0  # no arguments: the run config says it all

    parallel_state.initialize_model_parallel(1)
    ours = model_from_checkpoint(checkpoint).model
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                                attn_implementation="eager")
    assert type(hf).__name__ == "GPT2LMHeadModel"  # learned positions, LayerNorm, gelu, biases, tied: GPT-2
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = torch.randint(0, ours.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens, torch.arange(16).expand(2, 16), None)
        got = hf.eval()(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_plain_dist_checkpointing_save_exports_with_config(tmp_path):
    """A checkpoint with no description (``dist_checkpointing.save`` alone) exports given the run YAML."""
    from megatron_core import dist_checkpointing
    from megatron_core.training.run_config import build_model

    run = RunConfig.from_yaml(CONFIG)
    torch.manual_seed(0)
    model = build_model(run).eval()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "ckpt"))
    from megatron_core.interop import HFInteropError

    with pytest.raises(HFInteropError, match="does not describe its model.*--config"):
        main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--config", str(CONFIG),
                 "--dtype", "bf16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.dtype == torch.bfloat16
    for name, param in model.state_dict().items():
        if name == "embedding.word_embeddings.weight":
            assert torch.equal(hf.transformer.wte.weight, param.to(torch.bfloat16))
    tokens = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.to(torch.bfloat16)(tokens, torch.arange(16).expand(2, 16), None).float()
        got = hf(input_ids=tokens).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)


def test_a_save_dir_exports_its_latest_checkpoint(tmp_path):
    """``export-hf RUN_DIR``: a directory of iter_* checkpoints (the Trainer's save_dir) exports its latest one."""
    from megatron_core import dist_checkpointing
    from megatron_core.training.run_config import build_model

    run = RunConfig.from_yaml(CONFIG)
    for iteration, seed in ((2, 0), (4, 1)):
        torch.manual_seed(seed)
        model = build_model(run).eval()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / f"run/iter_{iteration:07d}"))
    (tmp_path / "run/iter_0000006").mkdir()  # an unfinished save: no metadata.json, skipped
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--config", str(CONFIG)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert torch.equal(hf.transformer.wte.weight, model.state_dict()["embedding.word_embeddings.weight"])
