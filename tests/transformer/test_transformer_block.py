"""TransformerBlock: full recompute is exact (with dropout), pipeline splits, global layer keys.

The pipeline test builds a 4-layer GPT as two stages on two processes, loads each stage from a
single-process model's state dict *through the checkpoint keys* (global layer index), runs forward
and backward across the stages by hand and compares loss and gradients with the single process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import ShardedTensor
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.norms import LayerNorm
from megatron_core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    _stage_layer_counts,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from specs.gpt import get_gpt_layer_local_spec

S, B, VOCAB = 8, 2, 64


def _config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=4, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _batch():
    g = torch.Generator().manual_seed(11)
    return (torch.randint(0, VOCAB, (B, S), generator=g), torch.arange(S).expand(B, S),
            torch.randint(0, VOCAB, (B, S), generator=g))


def _loss_and_grads(model: GPTModel, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, pos, labels = _batch()
    model_parallel_manual_seed(seed)  # same dropout masks for both runs
    loss = model(ids, pos, None, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method,count", [("uniform", 1), ("uniform", 2), ("block", 3)])
def test_full_recompute_gives_identical_outputs_and_grads_with_dropout(method, count):
    drop = dict(hidden_dropout=0.2, attention_dropout=0.2)
    model_parallel_manual_seed(0)
    plain = GPTModel(_config(**drop), get_gpt_layer_local_spec(), VOCAB, S)
    recomputed = GPTModel(_config(**drop, recompute_granularity="full", recompute_method=method,
                                  recompute_num_layers=count), get_gpt_layer_local_spec(), VOCAB, S)
    recomputed.load_state_dict(plain.state_dict())
    loss_a, grads_a = _loss_and_grads(plain, seed=3)
    loss_b, grads_b = _loss_and_grads(recomputed, seed=3)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-6, msg=name)
    _, grads_c = _loss_and_grads(plain, seed=4)  # the dropout masks really matter
    assert not torch.allclose(grads_c["embedding.word_embeddings.weight"], 2 * grads_a["embedding.word_embeddings.weight"])


def test_stage_layer_counts_with_first_and_last_overrides():
    assert _stage_layer_counts(_config(num_layers=8, pipeline_model_parallel_size=4)) == [2, 2, 2, 2]
    cfg = _config(num_layers=8, pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=2,
                  num_layers_in_last_pipeline_stage=2)
    assert _stage_layer_counts(cfg) == [2, 4, 2]
    cfg = _config(num_layers=7, pipeline_model_parallel_size=3, num_layers_in_last_pipeline_stage=1)
    assert _stage_layer_counts(cfg) == [3, 3, 1]
    assert get_num_layers_to_build(_config()) == 4 and get_transformer_layer_offset(_config()) == 0
    with pytest.raises(ValueError, match="initialize_model_parallel"):
        get_num_layers_to_build(_config(pipeline_model_parallel_size=2))


def test_block_accepts_block_submodules_and_sets_input_tensor():
    cfg = _config(num_layers=2)
    spec = TransformerBlockSubmodules(layer_specs=[get_gpt_layer_local_spec()] * 2, layer_norm=LayerNorm)
    block = TransformerBlock(cfg, spec, pre_process=False)
    assert [layer.layer_number for layer in block.layers] == [1, 2]
    x = torch.randn(S, B, 32)
    block.set_input_tensor(x)
    out = block(None, None)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    with pytest.raises(ValueError, match="set_input_tensor"):
        TransformerBlock(cfg, spec)(None, None)


def _pipeline_worker(full_state: dict[str, torch.Tensor]) -> dict:
    ps.initialize_model_parallel(1, 2)
    stage = ps.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == 1
    model_parallel_manual_seed(99)
    model = GPTModel(_config(pipeline_model_parallel_size=2), get_gpt_layer_local_spec(), VOCAB, S,
                     pre_process=first, post_process=last)
    sharded = model.sharded_state_dict()
    assert sharded.keys() == model.state_dict().keys()
    assert all(isinstance(v, ShardedTensor) for v in sharded.values())
    # Load through the checkpoint keys: local layer i of stage 1 is global layer 2 + i.
    model.load_state_dict({k: full_state[v.key] for k, v in sharded.items()}, strict=True)
    ids, pos, labels = _batch()
    peer = ps.get_pipeline_model_parallel_next_rank()
    if first:
        hidden = model(ids, pos, None)  # [s, b, h]
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
        loss = None
    else:
        hidden = torch.empty(S, B, 32)
        dist.recv(hidden, peer)
        hidden.requires_grad_()
        model.set_input_tensor(hidden)
        loss = model(None, pos, None, labels=labels)
        loss.mean().backward()
        dist.send(hidden.grad.contiguous(), peer)
    return {
        "layer_numbers": [layer.layer_number for layer in model.decoder.layers],
        "has_final_norm": model.decoder.final_layernorm is not None,
        "keys": {k: (v.key, v.replica_id) for k, v in sharded.items()},
        "grads": {sharded[n].key: p.grad for n, p in model.named_parameters()},
        "loss": None if loss is None else loss.detach(),
    }


def test_two_stage_pipeline_matches_single_stage(tmp_path):
    model_parallel_manual_seed(99)
    full = GPTModel(_config(), get_gpt_layer_local_spec(), VOCAB, S)
    ids, pos, labels = _batch()
    loss = full(ids, pos, None, labels=labels)
    loss.mean().backward()
    stage0, stage1 = run_distributed(_pipeline_worker, 2, full.state_dict(), tmp_dir=tmp_path)
    assert stage0["layer_numbers"] == [1, 2] and stage1["layer_numbers"] == [3, 4]
    assert not stage0["has_final_norm"] and stage1["has_final_norm"]
    assert stage1["keys"]["decoder.layers.0.mlp.linear_fc1.weight"][0] == "decoder.layers.2.mlp.linear_fc1.weight"
    # The last stage's tied output weight is a non-main copy of the embedding.
    key, replica = stage1["keys"]["output_layer.weight"]
    assert key == "embedding.word_embeddings.weight" and replica[0] == 1
    torch.testing.assert_close(stage1["loss"], loss.detach(), rtol=0, atol=1e-5)
    full_grads = {n: p.grad for n, p in full.named_parameters()}
    tied = stage0["grads"].pop("embedding.word_embeddings.weight") + stage1["grads"].pop(
        "embedding.word_embeddings.weight")
    torch.testing.assert_close(tied, full_grads.pop("embedding.word_embeddings.weight"), rtol=0, atol=1e-5)
    stage_grads = {**stage0["grads"], **stage1["grads"]}
    assert stage_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(stage_grads[name], grad, rtol=0, atol=1e-5, msg=name)
