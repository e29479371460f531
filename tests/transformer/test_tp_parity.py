"""Tensor-parallel parity: attention, MLP, layer and GPTModel at TP 2/4 (and sequence parallel) equal TP=1.

One spawn per (TP, sequence-parallel) setting builds every case on every rank from the same seed
(TP-invariant init makes the full weights identical), runs forward and backward with fixed inputs
and upstream gradients, and returns full outputs and full gradients (TP-split gradients gathered
along their split dimension, undoing the stride of the gated fc1). The parent compares each
setting with TP=1, in fp32, within 1e-5.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.models.gpt import GPTModel
from megatron_core.tensor_parallel.random import model_parallel_manual_seed
from megatron_core.testing import run_distributed
from megatron_core.transformer.positions import RotaryEmbedding
from megatron_core.transformer.spec_utils import build_module
from megatron_core.transformer.utils import allreduce_tp_partial_grads
from specs.gpt import get_gpt_layer_local_spec, get_mlp_local_spec
from specs.llama import LLAMA_MODEL_KWARGS, get_llama_layer_local_spec

SEED = 1234
S, B, H, VOCAB = 8, 2, 32, 64
ATOL = 1e-5

BASE = dict(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=64, hidden_dropout=0.0,
            attention_dropout=0.0, init_method_std=0.1)
LLAMA = dict(normalization="RMSNorm", activation_func="swiglu", add_bias_linear=False, num_attention_heads=8,
             num_query_groups=4)

# name -> (kind, config overrides)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "attention_mha": ("attention", {}),
    "attention_gqa2": ("attention", dict(num_attention_heads=8, num_query_groups=2)),
    "attention_gqa4": ("attention", dict(num_attention_heads=8, num_query_groups=4)),
    "mlp_gelu": ("mlp", {}),
    "mlp_swiglu": ("mlp", dict(activation_func="swiglu")),
    "layer": ("layer", dict(qk_layernorm=True, add_qkv_bias=True)),
    "gpt": ("gpt", {}),
    "llama": ("gpt", LLAMA),
}


def _valid(overrides: dict[str, Any], tp: int) -> bool:
    heads = overrides.get("num_attention_heads", BASE["num_attention_heads"])
    return overrides.get("num_query_groups", heads) % tp == 0


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "x": torch.randn(S, B, H, generator=g),
        "gy": torch.randn(S, B, H, generator=g),
        "ids": torch.randint(0, VOCAB, (B, S), generator=g),
        "labels": torch.randint(0, VOCAB, (B, S), generator=g),
        "loss_w": torch.rand(B, S, generator=g),
    }


def _full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The gradient of the whole (unsplit) parameter, gathered over the TP group."""
    grad = param.grad
    assert grad is not None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return grad.clone()
    dim, stride = param.partition_dim, param.partition_stride
    parts = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    # A rank holds chunks r, r + tp, ... of the full tensor (stride > 1 for [gate; up]).
    chunks = [p.chunk(stride, dim) for p in parts]
    return torch.cat([torch.cat([c[j] for c in chunks], dim) for j in range(stride)], dim)


def _gather_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim)


def _seq_slice(t: torch.Tensor, sp: bool) -> torch.Tensor:
    if not sp:
        return t
    return t.chunk(ps.get_tensor_model_parallel_world_size(), 0)[ps.get_tensor_model_parallel_rank()]


def _run_hidden_case(kind: str, cfg: TransformerConfig, d: dict[str, torch.Tensor], sp: bool) -> dict:
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm)
    model_parallel_manual_seed(SEED)
    if kind == "attention":
        module = build_module(layer_spec.submodules.self_attention, config=cfg, layer_number=1)
    elif kind == "mlp":
        module = build_module(get_mlp_local_spec(), config=cfg)
    else:
        module = build_module(layer_spec, config=cfg, layer_number=1)
    x = _seq_slice(d["x"], sp).clone().requires_grad_()
    if kind == "attention":
        rotary = RotaryEmbedding(cfg.kv_channels, rotary_percent=0.5)(S)
        out, bias = module(x, None, rotary_pos_emb=rotary)
        y = out + bias
    elif kind == "mlp":
        out, bias = module(x)
        y = out + bias
    else:
        y, _ = module(x)
    (y * _seq_slice(d["gy"], sp)).sum().backward()
    allreduce_tp_partial_grads(module)
    result = {"y": _gather_dim(y, 0) if sp else y.detach(), "dx": _gather_dim(x.grad, 0) if sp else x.grad}
    result.update({f"d:{n}": _full_grad(p) for n, p in module.named_parameters()})
    return result


def _run_gpt_case(overrides: dict[str, Any], cfg: TransformerConfig, d: dict[str, torch.Tensor]) -> dict:
    model_parallel_manual_seed(SEED)
    is_llama = overrides is LLAMA
    spec = get_llama_layer_local_spec() if is_llama else get_gpt_layer_local_spec()
    kwargs = LLAMA_MODEL_KWARGS if is_llama else {}
    model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=S, **kwargs)
    positions = torch.arange(S).expand(B, S)
    with torch.no_grad():
        logits = _gather_dim(model(d["ids"], positions, None), -1)  # [b, s, vocab]
    loss = model(d["ids"], positions, None, labels=d["labels"])
    (loss * d["loss_w"]).sum().backward()
    allreduce_tp_partial_grads(model)
    result = {"logits": logits, "loss": loss.detach()}
    result.update({f"d:{n}": _full_grad(p) for n, p in model.named_parameters()})
    return result


def _parity_worker(tp: int, sp: bool) -> dict[str, dict[str, torch.Tensor]]:
    ps.initialize_model_parallel(tp)
    torch.use_deterministic_algorithms(True)
    d = _data()
    results = {}
    for name, (kind, overrides) in CASES.items():
        if not _valid(overrides, tp):
            continue
        cfg = TransformerConfig(**{**BASE, **overrides, "tensor_model_parallel_size": tp, "sequence_parallel": sp})
        if kind == "gpt":
            results[name] = _run_gpt_case(overrides, cfg, d)
        else:
            results[name] = _run_hidden_case(kind, cfg, d, sp)
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    return run_distributed(_parity_worker, 1, 1, False, tmp_dir=tmp_path_factory.mktemp("tp1"))[0]


def _compare(got: dict, ref: dict, label: str) -> float:
    worst = 0.0
    for case, values in got.items():
        assert values.keys() == ref[case].keys(), f"{label}/{case}: different parameter sets"
        for key, value in values.items():
            assert value.shape == ref[case][key].shape, f"{label}/{case}/{key}: shape"
            diff = (value - ref[case][key]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= ATOL, f"{label}/{case}/{key}: max |diff| {diff:.3g} > {ATOL}"
    return worst


@pytest.mark.parametrize("tp,sp", [(2, False), (4, False), (2, True)], ids=["tp2", "tp4", "tp2-sp"])
def test_tensor_parallel_matches_tp1(reference, tmp_path, tp, sp):
    results = run_distributed(_parity_worker, tp, tp, sp, tmp_dir=tmp_path)
    expected_cases = {n for n, (_, o) in CASES.items() if _valid(o, tp)}
    assert set(results[0]) == expected_cases
    for rank, got in enumerate(results):
        worst = _compare(got, reference, f"tp{tp}{'-sp' if sp else ''}/rank{rank}")
    print(f"TP={tp} sp={sp}: worst max |diff| vs TP=1 = {worst:.3g}")


def test_reference_covers_gqa_and_all_cases(reference):
    assert set(reference) == set(CASES)
    # The GQA case really is grouped: the fused QKV has (8 + 2*2) heads of 4 channels.
    assert reference["attention_gqa2"]["d:linear_qkv.weight"].shape == ((8 + 2 * 2) * 4, H)
    assert reference["mlp_swiglu"]["d:linear_fc1.weight"].shape == (2 * 64, H)
