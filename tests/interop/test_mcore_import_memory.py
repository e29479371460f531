"""import-mcore streams: its peak memory is about one stored layer tensor, not the model (measured in a fresh process).

The checkpoint is written the way Megatron-Core writes one (``torch.distributed.checkpoint`` with a
torch ``ShardedTensor`` per layer-stacked key, one chunk per layer, Megatron-Core's key names), by
a separate process, so that the measuring process holds nothing of it.
"""

from __future__ import annotations

import pytest
import torch

from megatron_core.testing import run_distributed
from tests.interop.peak_memory import cli_peak_memory_above_baseline

_YAML = """\
transformer: {{num_layers: {layers}, hidden_size: {hidden}, num_attention_heads: 8, ffn_hidden_size: {ffn},
              hidden_dropout: 0.0, attention_dropout: 0.0}}
spec: specs.gpt.get_gpt_layer_local_spec
model: {{position_embedding_type: learned_absolute, share_embeddings_and_output_weights: true}}
data: {{seq_length: {seq}}}
"""


def _shapes(layers: int, hidden: int, vocab: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Megatron-Core's stored keys of a local-spec GPT (gelu, biases, learned positions, tied output)."""
    h, f = hidden, 4 * hidden
    per_layer = {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
                 "self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
                 "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
                 "pre_mlp_layernorm.weight": (h,), "pre_mlp_layernorm.bias": (h,),
                 "mlp.linear_fc1.weight": (f, h), "mlp.linear_fc1.bias": (f,),
                 "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,)}
    return {"embedding.word_embeddings.weight": (vocab, h), "embedding.position_embeddings.weight": (seq, h),
            "decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,),
            **{f"decoder.layers.{k}": (layers, *s) for k, s in per_layer.items()}}


def _write_mcore_checkpoint(path: str, layers: int, hidden: int, vocab: int, seq: int) -> int:
    """Save like Megatron-Core (per-layer chunks of the stacked keys); returns the largest chunk's bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    state, largest = {}, 0
    for key, shape in _shapes(layers, hidden, vocab, seq).items():
        full = torch.randn(shape) * 0.02
        if key.startswith("decoder.layers."):
            shards = [Shard.from_tensor_and_offsets(full[i:i + 1].clone(), [i] + [0] * (len(shape) - 1), rank=0)
                      for i in range(layers)]
            state[key] = init_from_local_shards(shards, list(shape))
            largest = max(largest, full[0].numel() * 4)
        else:
            state[key] = full
            largest = max(largest, full.numel() * 4)
    dcp.save(state, checkpoint_id=path)
    return largest


@pytest.mark.slow
def test_import_mcore_peak_memory_is_one_tensor_not_the_model(tmp_path):
    big = dict(layers=8, hidden=512, vocab=8192, seq=64)
    tiny = dict(layers=1, hidden=32, vocab=64, seq=16)
    largest = run_distributed(_write_mcore_checkpoint, 1, str(tmp_path / "big"), *big.values(), tmp_dir=tmp_path)[0]
    run_distributed(_write_mcore_checkpoint, 1, str(tmp_path / "tiny"), *tiny.values(), tmp_dir=tmp_path)
    model_bytes = sum(torch.Size(s).numel() * 4 for s in _shapes(**big).values())
    for name, size in (("big", big), ("tiny", tiny)):
        (tmp_path / f"{name}.yaml").write_text(_YAML.format(ffn=4 * size["hidden"], **size))
    extra = cli_peak_memory_above_baseline(
        ["import-mcore", str(tmp_path / "tiny"), str(tmp_path / "tiny_ckpt"), "--config", str(tmp_path / "tiny.yaml")],
        ["import-mcore", str(tmp_path / "big"), str(tmp_path / "ckpt"), "--config", str(tmp_path / "big.yaml")])
    print(f"[import-mcore memory] model {model_bytes / 2**20:.0f} MiB, largest stored chunk {largest / 2**20:.0f} MiB, "
          f"peak anonymous memory above baseline {extra / 2**20:.0f} MiB ({extra / model_bytes:.0%} of the model)")
    assert extra < min(0.4 * model_bytes, 3 * largest), (extra, model_bytes, largest)
    assert (tmp_path / "ckpt" / "metadata.json").is_file()
