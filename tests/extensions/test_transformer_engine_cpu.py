"""The TE wrappers' wiring on CPU, with the CPU reference of TE's API in place of Transformer Engine.

What this proves without a GPU: the wrappers accept their slots' calls, return what the local
modules return, initialise like the local layers, produce the local spec's checkpoint keys,
split axes and layouts at TP=1 and TP=2, load local state dicts and checkpoints, and vice versa.
TE's kernels themselves are compared with the local spec in ``tests/gpu`` on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.extensions.te_key_map import local_to_te_state_dict, te_to_local_state_dict
from megatron_core.models.gpt import GPTModel
from megatron_core.testing import run_distributed
from megatron_core.transformer.context_parallel import get_batch_on_this_cp_rank
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from specs.backends import get_llama_layer_te_spec
from specs.llama import LLAMA_MODEL_KWARGS
from tests.extensions._fake_te import enable_fake_te, fake_te
from tests.extensions._te_models import (
    FAMILIES,
    batch,
    build,
    describe_sharded,
    make_config,
    same_description,
)


@pytest.fixture
def te() -> Iterator[ModuleType]:
    with fake_te() as wrappers:
        yield wrappers


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- whole models, TP=1
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_the_same_weights_logits_and_grads(te: ModuleType, family: str) -> None:
    """Stand-in TE (CPU). Verifies same init, logits and grads as the local spec through the wrappers' wiring
    (GPT, Llama). Does not verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16
    paths, FP8).
    """
    local, te_model = build(family, "local", seed=3), build(family, "te", seed=3)
    local_sd = local.state_dict()
    mapped = te_to_local_state_dict(te_model.state_dict())
    assert mapped.keys() == local_sd.keys()
    assert all(torch.equal(mapped[k], local_sd[k]) for k in local_sd)  # TP-invariant init is shared

    ids, positions = batch()
    logits_local, logits_te = local(ids, positions, None), te_model(ids, positions, None)  # [b, s, vocab]
    assert (logits_te - logits_local).abs().max().item() < 1e-5
    logits_local.square().mean().backward()
    logits_te.square().mean().backward()
    grads_local, grads_te = _grads(local), te_to_local_state_dict(_grads(te_model))
    assert grads_te.keys() == grads_local.keys()
    for name, grad in grads_local.items():
        torch.testing.assert_close(grads_te[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dicts_round_trip_between_specs(te: ModuleType, family: str) -> None:
    """Stand-in TE (CPU). Verifies state-dict keys and the TE<->local key map, both ways. Does not verify TE's
    kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    local, te_model = build(family, "local", seed=1), build(family, "te", seed=2)
    local_sd = local.state_dict()
    assert set(te_model.state_dict()) == set(local_to_te_state_dict(local_sd, with_extra_state=True))
    te_model.load_state_dict(local_to_te_state_dict(local_sd), strict=True)  # no _extra_state needed
    back = te_to_local_state_dict(te_model.state_dict())
    assert all(torch.equal(back[k], local_sd[k]) for k in local_sd)
    fresh = build(family, "local", seed=5)
    fresh.load_state_dict(back, strict=True)
    ids, positions = batch()
    assert torch.equal(fresh(ids, positions, None), local(ids, positions, None))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_state_dict_equals_the_local_one(te: ModuleType, family: str) -> None:
    """Stand-in TE (CPU). Verifies checkpoint keys, shapes and split axes equal the local spec's. Does not
    verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    local, te_model = build(family, "local", seed=4), build(family, "te", seed=4)
    te_sharded = te_model.sharded_state_dict()
    assert same_description(describe_sharded(te_sharded), describe_sharded(local.sharded_state_dict()))
    # dict keys stay the module's state_dict names, so a loaded dict feeds load_state_dict directly
    assert set(te_sharded) == {k for k in te_model.state_dict() if not k.endswith("_extra_state")}
    assert te_sharded["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"].key == "decoder.layers.1.pre_mlp_layernorm.weight"


# ----------------------------------------------------------------------------- modules
def test_activation_ops_follow_the_config(te: ModuleType) -> None:
    """Stand-in TE (CPU). Verifies which activation op the wrapper picks from the config. Does not verify TE's
    kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    x = torch.randn(3, 2, 16)
    for name, expected in [
        ("swiglu", torch.nn.functional.silu(x[..., :8]) * x[..., 8:]),
        ("gelu_tanh", torch.nn.functional.gelu(x, approximate="tanh")),
        ("squared_relu", torch.relu(x) ** 2),
    ]:
        op = te.TEActivationOp(config=TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                                        activation_func=name))
        torch.testing.assert_close(op(x), expected)
    with pytest.raises(ValueError, match="tanh approximation"):
        te.TEActivationOp(config=TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2))


def test_te_activation_in_the_llama_mlp(te: ModuleType) -> None:
    """Stand-in TE (CPU). Verifies the TE activation slot in the Llama MLP: logits and keys. Does not verify
    TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    torch.manual_seed(0)
    model = GPTModel(make_config("llama"), get_llama_layer_te_spec(use_te_activation_func=True), vocab_size=64,
                     max_sequence_length=16, **LLAMA_MODEL_KWARGS)
    reference = build("llama", "local", seed=0)
    ids, positions = batch()
    assert (model(ids, positions, None) - reference(ids, positions, None)).abs().max().item() < 1e-5
    assert "decoder.layers.0.mlp.activation_module.op._extra_state" in model.state_dict()
    model.load_state_dict(local_to_te_state_dict(reference.state_dict()), strict=True)


def test_replicated_te_linear(te: ModuleType) -> None:
    """Stand-in TE (CPU). Verifies TELinear(parallel_mode=None) outputs, bias handling and sharding. Does not
    verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    ``TELinear(parallel_mode=None)``: a whole weight on every rank, bias returned when skipped.
    """
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2)
    torch.manual_seed(0)
    layer = te.TELinear(16, 8, parallel_mode=None, config=config, init_method=config.init_method, bias=True,
                        skip_bias_add=True)
    x = torch.randn(3, 2, 16)
    out, bias = layer(x)
    torch.testing.assert_close(out, x @ layer.weight.T)
    assert bias is layer.bias
    sharded = layer.sharded_state_dict("proj.")
    assert sorted(sharded) == ["proj.bias", "proj.weight"]
    assert sharded["proj.weight"].global_shape == (8, 16) and sharded["proj.weight"].axis_fragmentations == (1, 1)
    with pytest.raises(ValueError, match="parallel_mode='diagonal'"):
        te.TELinear(16, 8, parallel_mode="diagonal", config=config, init_method=config.init_method, bias=True,
                    skip_bias_add=False)


def test_fused_norm_refuses_post_norm_layers(te: ModuleType) -> None:
    """Stand-in TE (CPU). Verifies the refusal of post-norm layers by the fused norm-linear. Does not verify
    TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, layernorm_position="post")
    with pytest.raises(ValueError, match="layernorm_position='post'"):
        te.TELayerNormColumnParallelLinear(16, 48, config=config, init_method=config.init_method,
                                           gather_output=False, bias=True, skip_bias_add=False)


@pytest.mark.parametrize("case", ["causal", "causal_kv_cache", "padding_mask", "causal_and_mask",
                                  "no_mask_ignores_mask", "bias"])
def test_attention_masks_match_the_local_core(te: ModuleType, case: str) -> None:
    """Stand-in TE (CPU). Verifies how masks, KV-cache alignment and bias are passed to TE's attention API.
    Does not verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0)
    sq, sk, b = (3, 7, 2) if case == "causal_kv_cache" else (5, 5, 2)
    q, k, v = torch.randn(sq, b, 4, 8), torch.randn(sk, b, 2, 8), torch.randn(sk, b, 2, 8)
    mask_type = AttnMaskType.no_mask if case == "no_mask_ignores_mask" else (
        AttnMaskType.padding if case == "padding_mask" else AttnMaskType.causal)
    mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
    mask[1, ..., -2:] = True  # the second sequence is padded
    mask = mask if case in ("padding_mask", "causal_and_mask", "no_mask_ignores_mask") else None
    bias = torch.randn(1, 4, sq, sk) if case == "bias" else None
    kwargs = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    expected = DotProductAttention(**kwargs)(q, k, v, mask, attention_bias=bias)
    actual = te.TEDotProductAttention(**kwargs)(q, k, v, mask, attention_bias=bias)  # [sq, b, np*hn]
    assert actual.shape == (sq, b, 32)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- TP=2
def _tp2_worker(family: str, sequence_parallel: bool) -> dict[str, object]:
    enable_fake_te()
    parallel_state.initialize_model_parallel(2, 1)
    extra = {"sequence_parallel": True} if sequence_parallel else {}
    local, te_model = build(family, "local", seed=6, tp=2, **extra), build(family, "te", seed=6, tp=2, **extra)
    ids, positions = batch()
    logits_local, logits_te = local(ids, positions, None), te_model(ids, positions, None)  # [b, s, vocab/tp]
    return {
        "same_sharding": same_description(describe_sharded(te_model.sharded_state_dict()),
                                          describe_sharded(local.sharded_state_dict())),
        "logits_diff": (logits_te - logits_local).abs().max().item(),
        "gather_diff": _gather_output_diff(),
    }


def _gather_output_diff() -> float:
    """``gather_output=True`` and ``input_is_parallel=False`` behave as the local layers do."""
    import megatron_core.extensions.transformer_engine as te_wrappers
    from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, tensor_model_parallel_size=2)
    common = dict(config=config, init_method=config.init_method, bias=True, skip_bias_add=False)
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    col_local = ColumnParallelLinear(16, 8, gather_output=True, **common)
    row_local = RowParallelLinear(8, 16, input_is_parallel=False, **common)
    torch.manual_seed(0)
    col_te = te_wrappers.TEColumnParallelLinear(16, 8, gather_output=True, **common)
    row_te = te_wrappers.TERowParallelLinear(8, 16, input_is_parallel=False, **common)
    expected = row_local(col_local(x)[0])[0]  # [4, 2, 16]
    actual = row_te(col_te(x)[0])[0]
    return (actual - expected).abs().max().item()


@pytest.mark.parametrize("family,sequence_parallel", [("gpt", False), ("gpt", True), ("llama", False)])
def test_tp2_sharding_and_logits_match_the_local_spec(family: str, sequence_parallel: bool, tmp_path) -> None:
    """Stand-in TE (CPU). Verifies TP=2 (and sequence-parallel) sharding and the wrappers' collectives. Does
    not verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths, FP8).
    """
    for rank in run_distributed(_tp2_worker, 2, family, sequence_parallel, tmp_dir=tmp_path):
        assert rank["same_sharding"]
        assert rank["logits_diff"] < 1e-5
        assert rank["gather_diff"] < 1e-6


# ----------------------------------------------------------------------------- context parallelism
def _cp2_worker(family: str) -> dict[str, object]:
    enable_fake_te()
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    # The local spec's ring attention at CP=2 equals CP=1 (tests/models/test_gpt_context_parallel.py).
    local = build(family, "local", seed=6, context_parallel_size=2)
    te_model = build(family, "te", seed=6, context_parallel_size=2)
    ids, positions = batch()
    chunk = get_batch_on_this_cp_rank({"tokens": ids, "position_ids": positions})  # chunks r and 3 - r
    logits_local = local(chunk["tokens"], chunk["position_ids"], None)  # [b, s/2, vocab]
    logits_te = te_model(chunk["tokens"], chunk["position_ids"], None)
    logits_local.square().mean().backward()
    logits_te.square().mean().backward()
    grads_local, grads_te = _grads(local), te_to_local_state_dict(_grads(te_model))
    assert grads_te.keys() == grads_local.keys()
    with pytest.raises(ValueError, match="no attention_mask"):
        te_model.decoder.layers[0].self_attention.core_attention(
            *(torch.zeros(8, 2, 4, 16) for _ in range(3)), torch.zeros(2, 1, 8, 8, dtype=torch.bool))
    return {"logits_diff": (logits_te - logits_local).abs().max().item(),
            "grad_diff": max((grads_te[k] - g).abs().max().item() for k, g in grads_local.items())}


@pytest.mark.parametrize("family", FAMILIES)
def test_cp2_te_attention_gets_the_context_parallel_group(family: str, tmp_path) -> None:
    """Stand-in TE (CPU). Verifies that under CP=2 the TE core receives the CP group, its global ranks and
    ``cp_comm_type="p2p"`` and the load-balanced chunks, by matching the local spec's ring attention (logits and
    every gradient). The stand-in attends over all-gathered keys at true positions; it does NOT verify TE's
    own context-parallel kernels (no GPU / TE here): unverified on Transformer Engine.
    """
    for rank in run_distributed(_cp2_worker, 2, family, tmp_dir=tmp_path):
        assert rank["logits_diff"] < 1e-5
        assert rank["grad_diff"] < 1e-5


# ----------------------------------------------------------------------------- BERT and T5
def _bert(backend: str) -> torch.nn.Module:
    from megatron_core.models.bert import BertModel
    from specs.backends import get_bert_layer_spec
    from specs.bert import bert_config

    config = bert_config(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                         attention_dropout=0.0)
    torch.manual_seed(8)
    return BertModel(config, get_bert_layer_spec(backend=backend), vocab_size=64, max_sequence_length=16)


def _t5(backend: str) -> torch.nn.Module:
    from megatron_core.models.t5 import T5Model
    from specs.backends import get_t5_layer_specs
    from specs.t5 import t5_config

    config = t5_config("1.1", num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
                       ffn_hidden_size=64, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(9)
    return T5Model(config, *get_t5_layer_specs(backend=backend), vocab_size=64, max_sequence_length=16)


def test_bert_te_spec_matches_local(te: ModuleType) -> None:
    """Stand-in TE (CPU). Verifies the BERT TE spec's wiring: separate norms, padding mask as TE's 'arbitrary'
    mask. Does not verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention, TF32/bf16 paths,
    FP8). Post-norm BERT: separate TE norms, padding masks through TE's 'arbitrary' mask.
    """
    local, te_model = _bert("local"), _bert("te")
    assert isinstance(te_model.encoder.layers[0].input_layernorm, te.TELayerNorm)
    mapped = te_to_local_state_dict(te_model.state_dict())
    assert all(torch.equal(mapped[k], v) for k, v in local.state_dict().items()) and mapped.keys() == local.state_dict().keys()
    ids = batch()[0]
    pad = torch.ones_like(ids)
    pad[1, -3:] = 0  # the second sequence is padded
    (lm_local, binary_local), (lm_te, binary_te) = local(ids, pad), te_model(ids, pad)
    assert (lm_te - lm_local).abs().max().item() < 1e-5
    assert (binary_te - binary_local).abs().max().item() < 1e-5
    assert same_description(describe_sharded(te_model.sharded_state_dict()), describe_sharded(local.sharded_state_dict()))
    te_model.load_state_dict(local_to_te_state_dict(local.state_dict(), fused_norms=False), strict=True)


def test_t5_te_spec_matches_local(te: ModuleType) -> None:
    """Stand-in TE (CPU). Verifies the T5 TE spec's wiring: fused cross-attention norm, relative bias through
    TE's bias input. Does not verify TE's kernels (fused norm+GEMM numerics, flash/cuDNN attention,
    TF32/bf16 paths, FP8). T5: fused norms (cross-attention's into linear_q), relative position bias through
    TE's bias input.
    """
    local, te_model = _t5("local"), _t5("te")
    local_sd = local.state_dict()
    mapped = te_to_local_state_dict(te_model.state_dict())
    assert mapped.keys() == local_sd.keys() and all(torch.equal(mapped[k], v) for k, v in local_sd.items())
    assert "decoder.layers.1.cross_attention.linear_q.layer_norm_weight" in te_model.state_dict()
    enc, dec = batch(1)[0], batch(2)[0][:, :10]
    enc_mask = torch.ones_like(enc)
    enc_mask[0, -4:] = 0
    logits_local, logits_te = local(enc, dec, enc_mask), te_model(enc, dec, enc_mask)  # [b, s_dec, vocab]
    assert (logits_te - logits_local).abs().max().item() < 1e-5
    assert same_description(describe_sharded(te_model.sharded_state_dict()), describe_sharded(local.sharded_state_dict()))
    te_model.load_state_dict(local_to_te_state_dict(local_sd), strict=True)
