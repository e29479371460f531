"""A tokenizer.json trained offline in the test, used end to end: preprocess, train, generate, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_core.data import HFTokenizer, IndexedDataset, TokenizerError

tokenizers = pytest.importorskip("tokenizers")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "\n\n"
        + "pack my box with five dozen liquor jugs. " * 3 + "\n\n") * 10


def _train_tokenizer(path: Path) -> Path:
    """A byte-level BPE with <|endoftext|>, trained on TEXT (no download)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    tok.save(str(path))
    return path


def test_tokenizer_round_trip_and_errors(tmp_path):
    path = _train_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(path)
    reference = tokenizers.Tokenizer.from_file(str(path))
    ids = tok.encode("the lazy dog jumps", add_eos=True)
    assert ids[:-1] == reference.encode("the lazy dog jumps").ids and ids[-1] == reference.token_to_id("<|endoftext|>")
    assert len(ids) < len("the lazy dog jumps")  # merges learned: fewer ids than bytes
    assert tok.decode(ids) == "the lazy dog jumps"
    assert tok.vocab_size % 8 == 0 and tok.vocab_size >= tok.num_real_tokens == reference.get_vocab_size()
    with pytest.raises(TokenizerError, match="nope.json not found"):
        HFTokenizer(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="no end-of-document token among \\['<eos>'\\]"):
        HFTokenizer(path, eos_token="<eos>")


def test_preprocess_cli_with_tokenizer(tmp_path):
    from megatron_core.data.preprocess import main

    path = _train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "a.txt").write_text(TEXT)
    main(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "a"), "--split-paragraphs",
          "--tokenizer", str(path)])
    ds, tok = IndexedDataset(tmp_path / "a"), HFTokenizer(path)
    paragraphs = [p for p in TEXT.split("\n\n") if p.strip()]
    assert ds.num_documents == len(paragraphs) == 20
    for d, paragraph in enumerate(paragraphs[:2]):
        assert ds.document(d).tolist() == tok.encode(paragraph, add_eos=True)


@pytest.mark.slow
def test_train_generate_and_export_with_a_tokenizer_json(tmp_path):
    from megatron_core import parallel_state
    from megatron_core.inference import generate
    from megatron_core.inference.__main__ import main as generate_main
    from megatron_core.inference.sampling import SamplingParams
    from megatron_core.interop.__main__ import main as interop_main
    from megatron_core.train import main as train_main
    from megatron_core.training.run_config import model_from_checkpoint

    path = _train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "doc.txt").write_text(TEXT)
    result = train_main(["--config", str(EXAMPLES / "text_gpt.yaml"), "--set", f"data.paths=[{tmp_path}/doc.txt]",
                         "--set", f"data.prefix={tmp_path / 'data/doc'}", "--set", "data.seq_length=16",
                         "--set", "data.split_paragraphs=true", "--set", "model.position_embedding_type=learned_absolute",
                         "--set", f"data.tokenizer={{kind: hf, path: {path}}}",
                         "--set", "transformer.num_layers=1", "--set", "transformer.hidden_size=32",
                         "--set", "training.train_iters=2", "--set", "training.warmup_iters=1",
                         "--set", f"training.save_dir={tmp_path / 'ckpt'}", "--set", "training.metrics_file=null"])
    assert result.iteration == 2
    tok = HFTokenizer(path)
    assert IndexedDataset(tmp_path / "data/doc").document(0).tolist() == tok.encode(TEXT.split("\n\n")[0], add_eos=True)

    text = generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "the quick", "--max-new-tokens", "6"])
    parallel_state.initialize_model_parallel(1)
    loaded = model_from_checkpoint(tmp_path / "ckpt")
    assert loaded.model.vocab_size == tok.vocab_size
    prompt = torch.tensor([[tok.eos_id, *tok.encode("the quick")]])
    out = generate(loaded.model, prompt, 6, SamplingParams(0.0, 0, 1.0), vocab_size=tok.num_real_tokens,
                   eos_id=tok.eos_id, seed=0)
    assert text == tokenizers.Tokenizer.from_file(str(path)).decode(out.new_tokens(prompt.size(1))[0].tolist())
    parallel_state.destroy_model_parallel()

    checkpoint = sorted((tmp_path / "ckpt").glob("iter_*"))[-1]
    assert interop_main(["export-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == path.read_bytes()
