"""``python -m megatron_core.train --config`` on the shipped YAML, a few steps, then a resume."""

import json
from pathlib import Path

import pytest
import yaml

from megatron_core.cli import UserError
from megatron_core.train import main
from megatron_core.training import latest_checkpoint
from megatron_core.training.run_config import RunConfig, build_spec

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "alphabet_gpt.yaml"


def _args(tmp_path, iters):
    return ["--config", str(CONFIG),
            "--set", f"training.train_iters={iters}", "--set", "training.lr_decay_iters=6",
            "--set", "training.warmup_iters=2", "--set", "training.micro_batch_size=4",
            "--set", "training.eval_interval=2", "--set", "training.eval_iters=1", "--set", "training.save_interval=2",
            "--set", f"training.save_dir={tmp_path / 'ckpt'}", "--set", f"training.metrics_file={tmp_path / 'm.jsonl'}",
            "--set", "training.progress_bar=false", "--set", "data.seq_length=16"]


def test_train_entry_point_trains_saves_and_resumes(tmp_path):
    first = main(_args(tmp_path, 4))
    assert first.iteration == 4 and len(first.losses) == 4
    assert latest_checkpoint(tmp_path / "ckpt").name == "iter_0000004"
    saved = RunConfig.model_validate(yaml.safe_load((tmp_path / "ckpt" / "run_config.yaml").read_text()))
    assert saved.data.seq_length == 16 and saved.transformer["hidden_size"] == 64
    with (tmp_path / "m.jsonl").open("a") as f:  # as if the first run had died after iteration 4's checkpoint
        f.write('{"iteration": 5, "loss": 9.0}\n')
    second = main(_args(tmp_path, 6))
    assert second.start_iteration == 4 and second.iteration == 6 and len(second.losses) == 2
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in records if "valid_loss" in r] == [2, 4, 6]


def test_yaml_spec_form_and_errors(tmp_path):
    from megatron_core.transformer.spec_utils import spec_to_dict
    from specs.gpt import get_gpt_layer_local_spec

    data = yaml.safe_load(CONFIG.read_text())
    data["spec"] = spec_to_dict(get_gpt_layer_local_spec())
    run = RunConfig.model_validate(data)
    assert build_spec(run) == get_gpt_layer_local_spec()
    with pytest.raises(ValueError, match="training.min_lr"):
        RunConfig.from_yaml(CONFIG, ["training.min_lr=1.0"])
    with pytest.raises(ValueError, match="extra"):
        RunConfig.from_yaml(CONFIG, ["training.learning_rate=1.0"])
    with pytest.raises(ValueError, match="data.paths"):
        RunConfig.from_yaml(CONFIG, ["data.kind=text"])


def test_train_on_text_files_then_generate(tmp_path):
    from megatron_core.inference.__main__ import main as generate_main

    for i in range(2):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog.\n" * 30)
    text_config = CONFIG.parent / "text_gpt.yaml"
    result = main(["--config", str(text_config), "--set", f"data.paths=[{tmp_path}/*.txt]",
                   "--set", f"data.prefix={tmp_path / 'data/docs'}", "--set", "data.seq_length=32",
                   "--set", "transformer.num_layers=1", "--set", "transformer.hidden_size=32",
                   "--set", "training.train_iters=2", "--set", "training.warmup_iters=1",
                   "--set", f"training.save_dir={tmp_path / 'ckpt'}", "--set", "training.metrics_file=null",
                   "--set", "training.progress_bar=false"])
    assert result.iteration == 2 and (tmp_path / "data/docs.idx").is_file()
    text = generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "the ", "--max-new-tokens", "8",
                          "--temperature", "0.8", "--top-k", "5"])
    assert isinstance(text, str) and len(text.encode("utf-8", errors="replace")) <= 8 * 3
    with pytest.raises(FileNotFoundError, match="matches no file"):
        main(["--config", str(text_config), "--set", f"data.paths=[{tmp_path}/*.missing]",
              "--set", "training.save_dir=null"])


@pytest.mark.slow
def test_torchrun_two_processes_at_tp2_train_like_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m megatron_core.train`` (the entry point's own distributed init from
    torchrun's environment, gloo): a TP=2 checkpoint, and the loss curve of the same run in one process."""
    import os
    import subprocess
    import sys

    from megatron_core.dist_checkpointing.metadata import read_metadata

    args = [a.replace(str(tmp_path / "ckpt"), str(tmp_path / "tp2")).replace(str(tmp_path / "m.jsonl"),
                                                                             str(tmp_path / "tp2.jsonl"))
            for a in _args(tmp_path, 3)]
    env = {**os.environ, "PYTHONPATH": str(CONFIG.parents[1]), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "megatron_core.train", *args, "--set", "parallel.tensor_model_parallel_size=2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "tp2")
    assert checkpoint is not None and checkpoint.name == "iter_0000003"
    assert read_metadata(checkpoint).parallel_sizes["tensor_model_parallel_size"] == 2  # really two TP ranks
    records = [json.loads(line) for line in (tmp_path / "tp2.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in records if "loss" in r]
    one = main(_args(tmp_path, 3)).losses
    assert len(two) == 3
    assert two == pytest.approx(one, abs=1e-5)  # TP=2 only reorders float sums


def test_text_dataset_is_rebuilt_when_the_file_list_changes(tmp_path):
    """Same data.prefix, another (older) file list: the dataset holds the new files' tokens only."""
    import os

    from megatron_core.data import IndexedDataset
    from megatron_core.training.run_config import DataSection, build_datasets

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aaaa " * 40)
    b.write_text("bbbbbbbb " * 40)
    prefix = tmp_path / "data/text"
    build_datasets(DataSection(kind="text", paths=[str(a), str(b)], prefix=str(prefix), seq_length=8))
    both = sum(len(IndexedDataset(prefix)[i]) for i in range(len(IndexedDataset(prefix))))
    os.utime(a, (1, 1))  # older than the .idx: only the changed file list can trigger the rebuild
    build_datasets(DataSection(kind="text", paths=[str(a)], prefix=str(prefix), seq_length=8))
    only_a = sum(len(IndexedDataset(prefix)[i]) for i in range(len(IndexedDataset(prefix))))
    assert only_a < both and only_a == len(a.read_bytes()) + 1  # the bytes of a.txt and its <eos>


def test_text_data_too_small_for_validation_trains_without_it(tmp_path):
    """valid_fraction=0, or too few samples to hold one out: no validation (it used to crash after training)."""
    from megatron_core.training.run_config import DataSection, build_datasets

    (tmp_path / "a.txt").write_text("x" * 40)  # several samples of 8 tokens
    (tmp_path / "b.txt").write_text("x" * 9)  # one sample: nothing to hold out
    for name, fraction in (("a", 0.0), ("b", 0.3)):
        train, valid = build_datasets(DataSection(kind="text", paths=[str(tmp_path / f"{name}.txt")],
                                                  prefix=str(tmp_path / name), seq_length=8, valid_fraction=fraction))
        assert valid is None and len(train) == (5 if name == "a" else 1)  # type: ignore[arg-type]
    result = main(["--config", str(CONFIG.parent / "text_gpt.yaml"), "--set", f"data.paths=[{tmp_path}/a.txt]",
                   "--set", f"data.prefix={tmp_path / 'd'}", "--set", "data.seq_length=8",
                   "--set", "transformer.num_layers=1", "--set", "transformer.hidden_size=32",
                   "--set", "training.train_iters=2", "--set", "training.warmup_iters=1",
                   "--set", "data.valid_fraction=0", "--set", f"training.save_dir={tmp_path / 'ckpt'}",
                   "--set", "training.metrics_file=null", "--set", "training.progress_bar=false"])
    assert result.iteration == 2 and latest_checkpoint(tmp_path / "ckpt") is not None
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(UserError, match="cannot fill one sample of seq_length=8"):
        build_datasets(DataSection(kind="text", paths=[str(tmp_path / "tiny.txt")], prefix=str(tmp_path / "t"),
                                   seq_length=8))
