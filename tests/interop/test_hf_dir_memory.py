"""import-hf streams: its peak memory is about one key-table group, not the model (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

# Runs in a fresh interpreter: after a warm-up import of a tiny model of the same family, samples anonymous resident memory (heap, not the page cache of the
# memory-mapped safetensors files) every 2 ms while `import-hf` runs (the CLI: it also bounds malloc's cache); prints baseline and peak in bytes.
_CHILD = r"""
import json, sys, threading, time
from megatron_core.interop.__main__ import main

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

main(["import-hf", sys.argv[3], sys.argv[4]])  # warm-up on a tiny model: imports, registry, tensorstore's pools
baseline = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
main(["import-hf", sys.argv[1], sys.argv[2]])
done.append(1)
thread.join()
print(json.dumps({"baseline": baseline, "peak": max(peak[0], anon())}))
"""


@pytest.mark.slow
def test_import_hf_peak_memory_is_one_group_not_the_model(tmp_path):
    config = transformers.GPT2Config(n_layer=8, n_embd=512, n_head=8, vocab_size=8192, n_positions=64)
    model = transformers.GPT2LMHeadModel._from_config(config, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "hf", max_shard_size="40MB")
    del model
    tiny = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel._from_config(tiny).save_pretrained(tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "hf"), str(tmp_path / "ckpt"),
                          str(tmp_path / "tiny"), str(tmp_path / "tiny_ckpt")],
                         capture_output=True, text=True, check=True, timeout=300)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    extra = measured["peak"] - measured["baseline"]
    print(f"[import-hf memory] model {model_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"peak anonymous memory above baseline {extra / 2**20:.0f} MiB ({extra / model_bytes:.0%} of the model)")
    assert extra < min(0.4 * model_bytes, 3 * largest), (extra, model_bytes, largest)
    assert (tmp_path / "ckpt" / "metadata.json").is_file()
