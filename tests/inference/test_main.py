"""``python -m megatron_core.inference``: the text it prints is what ``generate`` gives on the same weights.

The reference rebuilds the model by hand from the YAML's fields (not through the entry point's
``model_from_checkpoint``), loads the checkpoint with ``training.load_model``, calls ``generate``
with the documented settings (prompt ``<bos>`` + letters, the tokenizer's real vocabulary, its
``<eos>``) and decodes the new tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from megatron_core import TransformerConfig
from megatron_core.data import AlphabetTokenizer
from megatron_core.inference import SamplingParams, generate
from megatron_core.inference.__main__ import main as generate_main
from megatron_core.models.gpt import GPTModel
from megatron_core.train import main as train_main
from megatron_core.training import latest_checkpoint, load_model
from specs.gpt import get_gpt_layer_local_spec

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "alphabet_gpt.yaml"
SEQ = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    save_dir = tmp_path_factory.mktemp("gen") / "ckpt"
    train_main(["--config", str(CONFIG), "--set", "training.train_iters=3", "--set", "training.warmup_iters=1",
                "--set", "training.micro_batch_size=8", "--set", "training.eval_interval=0",
                "--set", f"training.save_dir={save_dir}", "--set", "training.metrics_file=null",
                "--set", "training.progress_bar=false", "--set", f"data.seq_length={SEQ}",
                "--set", "training.lr=1.0e-2"])
    path = latest_checkpoint(save_dir)
    assert path is not None
    return path


def _by_hand(checkpoint: Path) -> GPTModel:
    run = yaml.safe_load(CONFIG.read_text())
    model = GPTModel(TransformerConfig(**run["transformer"]), get_gpt_layer_local_spec(),
                     vocab_size=AlphabetTokenizer().vocab_size, max_sequence_length=SEQ, **run["model"])
    load_model(checkpoint, model)
    return model.eval()


@pytest.mark.parametrize("sampling, cli", [
    (SamplingParams(), []),
    (SamplingParams(temperature=0.9, top_k=5, top_p=1.0), ["--temperature", "0.9", "--top-k", "5", "--seed", "3"]),
], ids=["greedy", "top-k sampling"])
def test_entry_point_text_equals_generate(checkpoint, sampling, cli):
    tokenizer = AlphabetTokenizer()
    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("cde")]])
    out = generate(_by_hand(checkpoint), prompt, 12, sampling, vocab_size=tokenizer.num_real_tokens,
                   eos_id=tokenizer.eos_id, seed=3 if cli else 0)
    want = tokenizer.decode(out.new_tokens(prompt.size(1))[0].tolist())
    assert want  # at least one token
    text = generate_main(["--checkpoint", str(checkpoint.parent), "--prompt", "cde", "--max-new-tokens", "12", *cli])
    assert text == want
