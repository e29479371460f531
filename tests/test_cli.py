"""Every entry point answers user errors with one line ``error: ...`` and exit status 2 (no traceback)."""

import runpy
import subprocess
import sys

import pytest

from tests.paths import FIXTURES

REPO = FIXTURES.parent.parent
CONFIG = str(REPO / "examples" / "alphabet_gpt.yaml")


def _run_module(module, argv, capsys, monkeypatch):
    """Run ``python -m module argv`` in this process (its ``__main__`` block); (status, stderr)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return exit_info.value.code, capsys.readouterr().err


def _assert_one_line(status, err, *needles):
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


CASES = {
    "train missing yaml": ("megatron_core.train", ["--config", "{tmp}/nope.yaml"], ["nope.yaml not found"]),
    "train malformed yaml": ("megatron_core.train", ["--config", "{tmp}/bad.yaml"], ["bad.yaml: not valid YAML"]),
    "train unknown --set key": ("megatron_core.train", ["--config", CONFIG, "--set", "training.learning_rate=1"],
                                ["training.learning_rate: unknown key"]),
    "train --set without =": ("megatron_core.train", ["--config", CONFIG, "--set", "training.lr"],
                              ["section.key=value"]),
    "train invalid config": ("megatron_core.train", ["--config", CONFIG, "--set", "transformer.hidden_size=63"],
                             ["hidden_size=63", "divisible"]),
    "train missing data": ("megatron_core.train", ["--config", CONFIG, "--set", "data.kind=indexed",
                                                   "--set", "data.prefix={tmp}/corpus"], ["corpus.idx not found"]),
    "train no --config": ("megatron_core.train", [], ["--config"]),
    "inference missing checkpoint": ("megatron_core.inference", ["--checkpoint", "{tmp}/none"],
                                     ["no complete checkpoint", "none"]),
    "preprocess missing input": ("megatron_core.data.preprocess", ["--input", "{tmp}/a.txt", "--output-prefix",
                                                                    "{tmp}/out"], ["a.txt not found"]),
    "dist_checkpointing not a checkpoint": ("megatron_core.dist_checkpointing", ["inspect", "{tmp}"], ["metadata"]),
    "interop import-mcore not a checkpoint": ("megatron_core.interop", ["import-mcore", "{tmp}", "{tmp}/out"],
                                              ["no .metadata file"]),
    "interop import-mcore without a description": (
        "megatron_core.interop", ["import-mcore", str(FIXTURES / "mcore_torch_dist_gpt" / "checkpoint"), "{tmp}/out"],
        ["pass --config"]),
    "interop import-hf not a model directory": ("megatron_core.interop", ["import-hf", "{tmp}", "{tmp}/out"],
                                                ["config.json not found"]),
    "interop export-hf missing checkpoint": ("megatron_core.interop", ["export-hf", "{tmp}/none", "{tmp}/out"],
                                             ["none"]),
    "demo unknown argument": ("megatron_core.demo", ["--nope"], ["--nope"]),
}


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.yaml").write_text("transformer: [unclosed\n")
    module, argv, needles = CASES[case]
    monkeypatch.chdir(tmp_path)
    status, err = _run_module(module, [a.format(tmp=tmp_path) for a in argv], capsys, monkeypatch)
    _assert_one_line(status, err, *needles)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["megatron_core.train", "--config", str(tmp_path / "nope.yaml"), "--debug"])
    from megatron_core.cli import UserError

    with pytest.raises(UserError, match="nope.yaml not found"):
        runpy.run_module("megatron_core.train", run_name="__main__", alter_sys=True)


def test_train_help_lists_sections_and_set_keys(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["megatron_core.train", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("megatron_core.train", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for needle in ("transformer:", "hidden_size", "data:", "prefix", "training:", "log_interval=1",
                   "parallel:", "tensor_model_parallel_size=1", "model:", "position_embedding_type"):
        assert needle in out, needle


def test_real_process_one_line(tmp_path):
    """The same through a real ``python -m`` (what a user types)."""
    proc = subprocess.run([sys.executable, "-m", "megatron_core.train", "--config", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    _assert_one_line(proc.returncode, proc.stderr, "x.yaml not found")


def test_training_without_a_terminal_logs_plain_lines(caplog):
    """stderr is not a tty under pytest: one log line per log_interval steps, no tqdm bar."""
    from megatron_core.train import main

    with caplog.at_level("INFO", logger="megatron_core.training.loop"):
        main(["--config", CONFIG, "--set", "training.train_iters=4", "--set", "training.log_interval=2",
              "--set", "training.warmup_iters=1", "--set", "training.save_dir=null", "--set", "training.eval_iters=1",
              "--set", "training.micro_batch_size=2", "--set", "data.seq_length=8"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration ") and "loss" in r.getMessage()
             and "/" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], lines
    assert all("tokens/s" in line and "lr" in line for line in lines)


def test_preprocess_runs_as_a_module_without_a_runpy_warning(tmp_path):
    """``python -m megatron_core.data.preprocess`` as the README shows it: no "found in sys.modules" warning."""
    (tmp_path / "a.txt").write_text("hello\n")
    proc = subprocess.run([sys.executable, "-m", "megatron_core.data.preprocess", "--input", str(tmp_path / "a.txt"),
                           "--output-prefix", str(tmp_path / "data/a")], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and "wrote" in proc.stderr + proc.stdout, proc.stderr
    assert (tmp_path / "data/a.idx").is_file()
