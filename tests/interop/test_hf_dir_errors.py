"""Bad Hugging Face directories: each error names the file and what to do."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_core.interop import HFInteropError
from megatron_core.interop.hf_dir import import_hf

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _save(path, **kwargs):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel._from_config(config).save_pretrained(path, **kwargs)


def test_unknown_family_names_config_json(tmp_path):
    _save(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFInteropError, match=r"config.json: model_type='mamba' \(architectures \['MambaForCausalLM'\]\) "
                                             r"has no converter; supported: \['bert', 'gpt2'"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_missing_shard_and_missing_weights_name_the_file(tmp_path):
    _save(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / shard).unlink()
    with pytest.raises(HFInteropError, match=rf"{shard}: shard listed in "
                                             r"model.safetensors.index.json is missing"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFInteropError, match=r"empty/config.json not found"):
        import_hf(tmp_path / "empty", tmp_path / "ckpt")


def test_dtype_we_cannot_store_names_file_and_key(tmp_path):
    _save(tmp_path / "hf")
    weights = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    weights["transformer.h.0.attn.c_attn.weight"] = weights["transformer.h.0.attn.c_attn.weight"].to(torch.int8)
    safetensors_torch.save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFInteropError, match=r"model.safetensors: tensor 'transformer.h.0.attn.c_attn.weight' has "
                                             r"dtype I8, which we cannot store.*dequantize"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
