"""At TP=2, replicated parameters get identical gradients on both ranks, and the global norm equals TP=1's."""

import pytest
import torch
import torch.distributed as dist

from megatron_core import TransformerConfig, parallel_state
from megatron_core.data import AlphabetDataset, collate
from megatron_core.distributed import finalize_model_grads
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.training import clip_grad_norm, grad_norm_plan, language_model_step
from specs.gpt import get_gpt_layer_local_spec

VARIANTS = {
    "plain": {},
    # Both make replicated parameters see only part of the data per rank: finalize_model_grads must sum them.
    "sequence_parallel+qk_layernorm": {"sequence_parallel": True, "qk_layernorm": True},
}


def _grads(tp, variant):
    model_parallel_manual_seed(3)
    extra = dict(VARIANTS[variant]) if tp > 1 else {"qk_layernorm": VARIANTS[variant].get("qk_layernorm", False)}
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, tensor_model_parallel_size=tp, **extra)
    model = GPTModel(config, get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm), vocab_size=32,
                     max_sequence_length=16)
    ds = AlphabetDataset(8, 16, seed=1)
    loss, count = language_model_step(model, collate([ds[i] for i in range(8)]))
    (loss / count).backward()
    params, counted = grad_norm_plan(model)
    finalize_model_grads([model])
    norm = clip_grad_norm(params, counted, max_norm=0.0)  # measure only
    names = {id(p): n for n, p in model.named_parameters()}
    return norm, {names[id(p)]: (p.grad.clone(), c) for p, c in zip(params, counted, strict=True)}


def _tp2(variant):
    parallel_state.initialize_model_parallel(2)
    norm, grads = _grads(2, variant)
    return dist.get_rank(), norm, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_replicated_grads_identical_and_norm_matches_tp1(tmp_path, variant):
    (_, norm0, grads0), (_, norm1, grads1) = run_distributed(_tp2, 2, variant, tmp_dir=tmp_path)
    replicated = [name for name, (_, counted) in grads1.items() if not counted]
    assert any("layernorm" in n for n in replicated) and any("linear_proj.bias" in n for n in replicated)
    assert all(grads0[n][1] for n in grads0), "rank 0 counts every parameter it holds"
    for name in replicated:
        torch.testing.assert_close(grads1[name][0], grads0[name][0], rtol=0, atol=1e-7, msg=name)
    norm_tp1, _ = _grads(1, variant)
    assert norm0 == norm1 == pytest.approx(norm_tp1, rel=1e-5)
