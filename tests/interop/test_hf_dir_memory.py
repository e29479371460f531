"""import-hf streams: its peak memory is about one key-table group, not the model (measured in a fresh process)."""

from __future__ import annotations

import pytest
import torch

from tests.interop.peak_memory import cli_peak_memory_above_baseline

transformers = pytest.importorskip("transformers")


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
    extra = cli_peak_memory_above_baseline(["import-hf", str(tmp_path / "tiny"), str(tmp_path / "tiny_ckpt")],
                                           ["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    print(f"[import-hf memory] model {model_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"peak anonymous memory above baseline {extra / 2**20:.0f} MiB ({extra / model_bytes:.0%} of the model)")
    assert extra < min(0.4 * model_bytes, 3 * largest), (extra, model_bytes, largest)
    assert (tmp_path / "ckpt" / "metadata.json").is_file()
