"""examples/custom_layer_spec.py runs end to end: custom MLP by spec, TP=2 train+save, TP=1 reload, SpecError."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_custom_layer_spec_example(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "custom_layer_spec.py"), "--out", str(tmp_path),
                           "--iters", "6"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "GatedMLP" in out and "trained 6 updates at TP=2" in out
    assert "reloaded" in out and "max |logit difference| vs TP=2" in out
    assert "SpecError" in out and "gate_proj" in out
    assert (tmp_path / "iter_0000006" / "metadata.json").is_file()
