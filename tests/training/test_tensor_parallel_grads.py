"""At TP=2, replicated parameters get identical gradients on both ranks, and the clipped norm equals TP=1's."""

import pytest
import torch
import torch.distributed as dist

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset, collate
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.training import clip_grad_norm, grad_norm_plan, language_model_step
from specs.gpt import get_gpt_layer_local_spec


def _grads(tp):
    model_parallel_manual_seed(3)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, tensor_model_parallel_size=tp)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=16)
    ds = AlphabetDataset(8, 16, seed=1)
    loss, count = language_model_step(model, collate([ds[i] for i in range(8)]))
    (loss / count).backward()
    params, counted = grad_norm_plan(model)
    norm = clip_grad_norm(params, counted, max_norm=0.0)  # measure only
    return model, params, counted, norm


def _tp2():
    parallel_state.initialize_model_parallel(2)
    model, params, counted, norm = _grads(2)
    replicated = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, c in zip(params, counted, strict=True):
        if dist.get_rank() == 1 and c:
            continue  # a shard: differs by design
        if not c or dist.get_rank() == 0:
            replicated[names[id(p)]] = p.grad.clone()
    return norm, replicated, [names[id(p)] for p, c in zip(params, counted, strict=True) if not c]


def test_replicated_grads_identical_and_norm_matches_tp1(tmp_path):
    (norm0, grads0, _), (norm1, grads1, skipped1) = run_distributed(_tp2, 2, tmp_dir=tmp_path)
    assert skipped1, "rank 1 should leave the replicated parameters (norms, row biases) out of the norm"
    assert any("layernorm" in n for n in skipped1) and any("linear_proj.bias" in n for n in skipped1)
    for name in skipped1:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-7, msg=name)
    _, _, _, norm_tp1 = _grads(1)
    assert norm0 == norm1 == pytest.approx(norm_tp1, rel=1e-5)
