"""Hugging Face directories in and out, per family: save_pretrained (sharded safetensors) -> import-hf ->
load at TP=1 and TP=2 (same logits as HF) -> export-hf -> the same tensors bit for bit, and
from_pretrained loads with no missing or unexpected keys and gives the same logits."""

from __future__ import annotations

import glob

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.interop.__main__ import main
from megatron_core.interop.description import load_checkpoint
from megatron_core.interop.hf_dir import load_hf_dir
from megatron_core.testing import run_distributed
from tests.interop.parity import perturb_

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

VOCAB, BATCH, SEQ = 96, 2, 10


def _hf_model(family: str) -> torch.nn.Module:
    t = transformers
    configs = {
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=VOCAB, n_positions=16,
                                                 bos_token_id=0, eos_token_id=0)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4,
                                                    num_key_value_heads=2, intermediate_size=80, vocab_size=VOCAB,
                                                    max_position_embeddings=16, tie_word_embeddings=False)),
        "gptj": (t.GPTJForCausalLM, t.GPTJConfig(n_layer=2, n_embd=48, n_head=4, rotary_dim=8, vocab_size=VOCAB,
                                                 n_positions=16, bos_token_id=0, eos_token_id=0)),
        "bert": (t.BertForPreTraining, t.BertConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4,
                                                    intermediate_size=80, vocab_size=VOCAB, max_position_embeddings=16,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        "mixtral": (t.MixtralForCausalLM, t.MixtralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                          num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                                                          max_position_embeddings=16, num_local_experts=4,
                                                          num_experts_per_tok=2)),
        "qwen2_moe": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                               num_key_value_heads=2, intermediate_size=48,
                                                               moe_intermediate_size=16, num_experts=4,
                                                               shared_expert_intermediate_size=24, num_experts_per_tok=2,
                                                               vocab_size=VOCAB, max_position_embeddings=16)),
        "qwen3_moe": (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                               num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                                               moe_intermediate_size=16, num_experts=4,
                                                               num_experts_per_tok=2, norm_topk_prob=True,
                                                               vocab_size=VOCAB, max_position_embeddings=16)),
        "t5": (t.T5ForConditionalGeneration, t.T5Config(num_layers=2, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                                                        vocab_size=VOCAB, dropout_rate=0.0,
                                                        relative_attention_num_buckets=8,
                                                        relative_attention_max_distance=20)),
    }
    cls, config = configs[family]
    torch.manual_seed(0)
    return perturb_(cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval())


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"tokens": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
            "decoder": torch.randint(0, VOCAB, (BATCH, SEQ - 3), generator=g)}


def hf_logits(family: str, model: torch.nn.Module) -> torch.Tensor:
    x = _inputs()
    with torch.no_grad():
        if family == "t5":
            return model(input_ids=x["tokens"], decoder_input_ids=x["decoder"]).logits
        if family == "bert":
            return model(input_ids=x["tokens"]).prediction_logits
        return model(input_ids=x["tokens"]).logits


def ours_logits(family: str, model: torch.nn.Module) -> torch.Tensor:
    """Our logits, gathered over the tensor-parallel vocabulary shards."""
    x = _inputs()
    with torch.no_grad():
        if family == "t5":
            out = model(x["tokens"], x["decoder"], torch.ones_like(x["tokens"]), torch.ones_like(x["decoder"]))
        elif family == "bert":
            out = model(x["tokens"], torch.ones_like(x["tokens"]), torch.zeros_like(x["tokens"]))[0]
        else:
            out = model(x["tokens"], torch.arange(SEQ).expand(BATCH, SEQ), None)
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        parts = [torch.empty_like(out) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, out.contiguous(), group=group)
        out = torch.cat(parts, dim=-1)
    return out


def _load_both_ways(family: str, hf_dir: str, checkpoint: str, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    parallel_state.initialize_model_parallel(tp)
    from_checkpoint = ours_logits(family, load_checkpoint(checkpoint)[0])
    from_dir = ours_logits(family, load_hf_dir(hf_dir))
    return from_checkpoint, from_dir


def _safetensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in glob.glob(f"{directory}/*.safetensors"):
        with safetensors.safe_open(file, "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj", "bert", "t5", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_hf_directory_round_trip(family, tmp_path):
    hf = _hf_model(family)
    want = hf_logits(family, hf)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # really sharded
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0

    tp1 = _load_both_ways(family, str(tmp_path / "hf"), str(tmp_path / "ckpt"), 1)
    parallel_state.destroy_model_parallel()
    tp2 = run_distributed(_load_both_ways, 2, family, str(tmp_path / "hf"), str(tmp_path / "ckpt"), 2,
                          tmp_dir=tmp_path)[0]
    for name, got in {"checkpoint TP=1": tp1[0], "load_hf_dir TP=1": tp1[1], "checkpoint TP=2": tp2[0],
                      "load_hf_dir TP=2": tp2[1]}.items():
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{family} {name}")

    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--max-shard-size", "30KB"]) == 0
    original, exported = _safetensors(tmp_path / "hf"), _safetensors(tmp_path / "out")
    assert exported.keys() == original.keys(), original.keys() ^ exported.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    back, info = type(hf).from_pretrained(tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(hf_logits(family, back.eval()), want, rtol=0, atol=0)
