"""Model resharding matrix: save a tiny GPT and a tiny Llama at TP in {1, 2, 4}, load at each of
{1, 2, 4}: the gathered full tensors are bit-identical and the loss on a fixed batch is unchanged.

Every tensor matters: before saving, every parameter (norms and biases included, which start at 1
and 0 whatever the seed) is overwritten with values drawn from its checkpoint key (``truth``, the
zoo harness's); the loading model is overwritten with other values (another salt), and every one of
its tensors is asserted to differ from the saved one before the load.

One 4-process run does the whole matrix: parallel_state is re-initialised for each TP size (the
remaining ranks are data-parallel replicas, which load but never write).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_core import dist_checkpointing as dc
from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from specs.gpt import get_gpt_layer_local_spec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec
from tests.models.zoo_harness import fill_with_truth

TPS = (1, 2, 4)
S, B, VOCAB = 8, 2, 64
BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, hidden_dropout=0.0,
            attention_dropout=0.0, init_method_std=0.1)
KINDS: dict[str, dict[str, Any]] = {
    "gpt": {},  # learned absolute positions, gelu, LayerNorm, biases, tied embeddings
    "llama": dict(normalization="RMSNorm", activation_func="swiglu", add_bias_linear=False, num_attention_heads=8,
                  num_query_groups=4),  # GQA, swiglu (factory-stored fc1), RoPE, untied output layer
}


def _model(kind: str, tp: int, seed: int, salt: int) -> GPTModel:
    """A model whose every tensor is its slice of ``truth(key, shape, salt)`` (the same full values at any TP)."""
    cfg = TransformerConfig(**{**BASE, **KINDS[kind], "tensor_model_parallel_size": tp})
    model_parallel_manual_seed(seed)
    if kind == "llama":
        model = GPTModel(cfg, get_llama_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=S,
                         **LLAMA_MODEL_KWARGS)
    else:
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=S)
    fill_with_truth(model, salt)
    return model


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter, gathered over TP (undoing the [gate; up] stride of a gated fc1)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    dim, stride = param.partition_dim, param.partition_stride
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    chunks = [p.chunk(stride, dim) for p in parts]
    return torch.cat([torch.cat([c[j] for c in chunks], dim) for j in range(stride)], dim)


def _loss(model: GPTModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    with torch.no_grad():
        return model(ids, torch.arange(S).expand(B, S), None, labels=labels).mean()


def _snapshot(model: GPTModel) -> dict[str, torch.Tensor]:
    return {name: _full(p) for name, p in model.named_parameters()}


def _matrix(root: str) -> dict[str, Any]:
    torch.use_deterministic_algorithms(True)
    saved, loaded, reference_loss = {}, {}, {}
    for tp in TPS:
        ps.initialize_model_parallel(tp)
        for kind in KINDS:
            model = _model(kind, tp, seed=100, salt=0)
            dc.save(model.sharded_state_dict(), Path(root) / f"{kind}_tp{tp}")
            saved[(kind, tp)] = (_snapshot(model), _loss(model))
        ps.destroy_model_parallel()
    for tp in TPS:
        ps.initialize_model_parallel(tp)
        for kind in KINDS:
            reference_loss[(kind, tp)] = _loss(_model(kind, tp, seed=100, salt=0))  # saved weights, this TP's sums
            for src in TPS:
                model = _model(kind, tp, seed=200, salt=1)  # other values everywhere: all must come from the file
                before = _snapshot(model)
                state = dc.load(model.sharded_state_dict(), Path(root) / f"{kind}_tp{src}")
                model.load_state_dict(state, strict=True)
                after = _snapshot(model)
                loaded[(kind, src, tp)] = (after, _loss(model), before)
        ps.destroy_model_parallel()
    if dist.get_rank() != 0:
        return {}
    return {"saved": saved, "loaded": loaded, "reference_loss": reference_loss}


@pytest.mark.slow
def test_reshard_matrix_gpt_and_llama(tmp_path):
    result = run_distributed(_matrix, 4, str(tmp_path), tmp_dir=tmp_path, timeout=400)[0]
    saved, loaded, ref = result["saved"], result["loaded"], result["reference_loss"]
    for kind in KINDS:
        truth, _ = saved[(kind, 1)]
        for tp in TPS:  # TP-invariant init: the same full weights were saved at every TP
            assert all(torch.equal(saved[(kind, tp)][0][n], truth[n]) for n in truth)
        for src in TPS:
            for tp in TPS:
                full, loss, before = loaded[(kind, src, tp)]
                assert before.keys() == full.keys() == truth.keys()
                same = [n for n in truth if torch.equal(before[n], truth[n])]
                assert not same, f"{kind} TP={src}->{tp}: equal to the saved tensor before the load: {same}"
                for name in truth:
                    assert torch.equal(full[name], truth[name]), f"{kind} TP={src}->{tp}: {name} differs"
                assert torch.equal(loss, ref[(kind, tp)]), f"{kind} TP={src}->{tp}: loss {loss} != {ref[(kind, tp)]}"
                torch.testing.assert_close(loss, saved[(kind, src)][1], rtol=0, atol=1e-5)
