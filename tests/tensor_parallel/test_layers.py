"""ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding at TP 1/2/4 against plain torch.

One spawn per TP size runs every layer on every rank; the parent gathers the ranks' slices of
outputs, weights and gradients and compares them with plain ``torch.nn.functional`` on the full
weights, which it draws from the same seed (so TP-invariant init is checked bit-exactly too).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from megatron_core import parallel_state as ps
from megatron_core.config import TransformerConfig
from megatron_core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelError,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
)
from megatron_core.testing import run_distributed
from megatron_core.transformer.mlp import LinearFc1Builder, LinearFc2Builder
from megatron_core.transformer.spec_utils import check_fits_protocol

HID, FFN, SEQ, BATCH, VOCAB = 16, 32, 8, 2, 24
SEED = 1234
ATOL = 1e-5


def _config(tp: int, sequence_parallel: bool = False) -> TransformerConfig:
    return TransformerConfig(
        num_layers=2, hidden_size=HID, num_attention_heads=4, ffn_hidden_size=FFN, init_method_std=0.3,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
    )


def _data() -> dict[str, torch.Tensor]:
    """Inputs, upstream gradients and biases: the same on every rank and in the parent."""
    g = torch.Generator().manual_seed(7)
    return {
        "x_h": torch.randn(SEQ, BATCH, HID, generator=g),
        "x_f": torch.randn(SEQ, BATCH, FFN, generator=g),
        "gy_f": torch.randn(SEQ, BATCH, FFN, generator=g),
        "gy_h": torch.randn(SEQ, BATCH, HID, generator=g),
        "b_f": torch.randn(FFN, generator=g),
        "b_h": torch.randn(HID, generator=g),
        "ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
        "gy_emb": torch.randn(BATCH, SEQ, HID, generator=g),
    }


def _full_weight(shape: tuple[int, int], std: float = 0.3) -> torch.Tensor:
    torch.manual_seed(SEED)
    w = torch.empty(shape)
    torch.nn.init.normal_(w, 0.0, std)
    return w


def _part(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.chunk(ps.get_tensor_model_parallel_world_size(), dim=dim)[ps.get_tensor_model_parallel_rank()]


def _grads(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor | None]:
    return {
        "y": y.detach(), "dx": x.grad, "w": layer.weight.detach(), "dw": layer.weight.grad,
        "db": None if layer.bias is None else layer.bias.grad,
    }


def _column(cfg: TransformerConfig, d: dict[str, torch.Tensor], gather: bool) -> dict:
    torch.manual_seed(SEED)
    layer = ColumnParallelLinear(HID, FFN, config=cfg, init_method=cfg.init_method, gather_output=gather)
    with torch.no_grad():
        layer.bias.copy_(_part(d["b_f"], 0))
    x = d["x_h"].clone().requires_grad_()
    y, bias = layer(x)
    assert bias is None
    y.backward(d["gy_f"] if gather else _part(d["gy_f"], -1))
    return _grads(layer, x, y)


def _row(cfg: TransformerConfig, d: dict[str, torch.Tensor], input_is_parallel: bool) -> dict:
    torch.manual_seed(SEED)
    layer = RowParallelLinear(FFN, HID, config=cfg, init_method=cfg.init_method, bias=True,
                              input_is_parallel=input_is_parallel, skip_bias_add=False)
    with torch.no_grad():
        layer.bias.copy_(d["b_h"])
    x = (_part(d["x_f"], -1) if input_is_parallel else d["x_f"]).clone().requires_grad_()
    y, bias = layer(x)
    assert bias is None
    y.backward(d["gy_h"])
    return _grads(layer, x, y)


def _embedding(cfg: TransformerConfig, d: dict[str, torch.Tensor]) -> dict:
    torch.manual_seed(SEED)
    emb = VocabParallelEmbedding(VOCAB, HID, init_method=cfg.init_method, config=cfg)
    y = emb(d["ids"])
    y.backward(d["gy_emb"])
    return {"y": y.detach(), "w": emb.weight.detach(), "dw": emb.weight.grad}


def _sharding(cfg: TransformerConfig) -> dict:
    torch.manual_seed(SEED)
    col = ColumnParallelLinear(HID, FFN, config=cfg, init_method=cfg.init_method)
    row = RowParallelLinear(FFN, HID, config=cfg, init_method=cfg.init_method, bias=True,
                            input_is_parallel=True, skip_bias_add=True)
    emb = VocabParallelEmbedding(VOCAB, HID, init_method=cfg.init_method, config=cfg)
    out = {}
    for name, layer in (("fc1.", col), ("fc2.", row), ("emb.", emb)):
        sharded = layer.sharded_state_dict(name, sharded_offsets=((0, 1, 3),))
        assert set(sharded) == {name + k for k in layer.state_dict()}
        out.update({k: (v.local_shape, v.global_shape, v.global_offset, v.replica_id) for k, v in sharded.items()})
    return out


def _on_rank(tp: int) -> dict:
    ps.initialize_model_parallel(tp)
    cfg, d = _config(tp), _data()
    out = {
        "col_split": _column(cfg, d, gather=False), "col_gather": _column(cfg, d, gather=True),
        "row_parallel_in": _row(cfg, d, input_is_parallel=True), "row_full_in": _row(cfg, d, input_is_parallel=False),
        "emb": _embedding(cfg, d), "sharding": _sharding(cfg),
    }
    torch.manual_seed(SEED)  # gated fc1 [gate; up] with stride 2: rank r holds [gate_r; up_r]
    out["stride2"] = ColumnParallelLinear(HID, 2 * FFN, config=cfg, init_method=cfg.init_method, stride=2).weight.data
    return out


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    tp = request.param
    return tp, run_distributed(_on_rank, tp, tp, tmp_dir=tmp_path_factory.mktemp(f"tp{tp}"))


def _cat(results: list[dict], case: str, key: str, dim: int) -> torch.Tensor:
    return torch.cat([r[case][key] for r in results], dim=dim)


def _each_equals(results: list[dict], case: str, key: str, expected: torch.Tensor) -> None:
    for rank, r in enumerate(results):
        torch.testing.assert_close(r[case][key], expected, atol=ATOL, rtol=0, msg=lambda m, rank=rank: f"rank {rank}: {m}")


def _reference_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gy: torch.Tensor) -> dict:
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = F.linear(x, w, b)
    y.backward(gy)
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}


def test_column_parallel_matches_plain_linear(ranks):
    tp, results = ranks
    d, w = _data(), _full_weight((FFN, HID))
    ref = _reference_linear(d["x_h"], w, d["b_f"], d["gy_f"])
    for case in ("col_split", "col_gather"):
        assert torch.equal(_cat(results, case, "w", 0), w), "TP-invariant init: full weight differs"
        if case == "col_split":
            torch.testing.assert_close(_cat(results, case, "y", -1), ref["y"], atol=ATOL, rtol=0)
        else:
            _each_equals(results, case, "y", ref["y"])
        _each_equals(results, case, "dx", ref["dx"])  # backward all-reduce gives every rank the full grad
        torch.testing.assert_close(_cat(results, case, "dw", 0), ref["dw"], atol=ATOL, rtol=0)
        torch.testing.assert_close(_cat(results, case, "db", 0), ref["db"], atol=ATOL, rtol=0)


def test_row_parallel_matches_plain_linear(ranks):
    tp, results = ranks
    d, w = _data(), _full_weight((HID, FFN))
    ref = _reference_linear(d["x_f"], w, d["b_h"], d["gy_h"])
    for case in ("row_parallel_in", "row_full_in"):
        assert torch.equal(_cat(results, case, "w", 1), w), "TP-invariant init: full weight differs"
        _each_equals(results, case, "y", ref["y"])
        if case == "row_parallel_in":
            torch.testing.assert_close(_cat(results, case, "dx", -1), ref["dx"], atol=ATOL, rtol=0)
        else:
            _each_equals(results, case, "dx", ref["dx"])
        torch.testing.assert_close(_cat(results, case, "dw", 1), ref["dw"], atol=ATOL, rtol=0)
        _each_equals(results, case, "db", ref["db"])  # replicated bias: every rank has the full grad


def test_vocab_parallel_embedding_matches_plain_embedding(ranks):
    tp, results = ranks
    d, w = _data(), _full_weight((VOCAB, HID))
    assert torch.equal(_cat(results, "emb", "w", 0), w)
    wr = w.clone().requires_grad_()
    y = F.embedding(d["ids"], wr)
    y.backward(d["gy_emb"])
    _each_equals(results, "emb", "y", y.detach())
    torch.testing.assert_close(_cat(results, "emb", "dw", 0), wr.grad, atol=ATOL, rtol=0)


def test_stride_two_init_is_tp_invariant(ranks):
    tp, results = ranks
    w = _full_weight((2 * FFN, HID))
    half = 2 * FFN // tp // 2
    gate = torch.cat([r["stride2"][:half] for r in results])
    up = torch.cat([r["stride2"][half:] for r in results])
    assert torch.equal(torch.cat([gate, up]), w)


def test_sharded_state_dict_layout(ranks):
    tp, results = ranks
    f, v = FFN // tp, VOCAB // tp
    for rank, r in enumerate(results):
        s = r["sharding"]
        # (local_shape, global_shape, global_offset, replica_id); axis 0 is the prepended layer axis (1 of 3)
        assert s["fc1.weight"] == ((f, HID), (3, FFN, HID), (1, rank * f, 0), (0, 0, 0))
        assert s["fc1.bias"] == ((f,), (3, FFN), (1, rank * f), (0, 0, 0))
        assert s["fc2.weight"] == ((HID, f), (3, HID, FFN), (1, 0, rank * f), (0, 0, 0))
        assert s["fc2.bias"] == ((HID,), (3, HID), (1, 0), (0, rank, 0))  # replicated: one main copy
        assert s["emb.weight"] == ((v, HID), (3, VOCAB, HID), (1, rank * v, 0), (0, 0, 0))


# ----------------------------------------------------------------------------- sequence parallelism
def _sequence_parallel_on_rank(tp: int) -> dict:
    """Column(SP) -> gelu -> Row(SP), and a reduce-scattering embedding, on [s/tp, b, h] chunks."""
    ps.initialize_model_parallel(tp)
    cfg, d = _config(tp, sequence_parallel=True), _data()
    torch.manual_seed(SEED)
    col = ColumnParallelLinear(HID, FFN, config=cfg, init_method=cfg.init_method)
    torch.manual_seed(SEED + 1)
    row = RowParallelLinear(FFN, HID, config=cfg, init_method=cfg.init_method, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        col.bias.copy_(_part(d["b_f"], 0))
        row.bias.copy_(d["b_h"])
    x = _part(d["x_h"], 0).clone().requires_grad_()  # [s/tp, b, h]
    h, _ = col(x)  # [s, b, ffn/tp]
    y, _ = row(F.gelu(h))  # [s/tp, b, h]
    y.backward(_part(d["gy_h"], 0))
    torch.manual_seed(SEED)
    emb = VocabParallelEmbedding(VOCAB, HID, init_method=cfg.init_method, config=cfg, reduce_scatter_embeddings=True)
    e = emb(d["ids"])  # [s/tp, b, h]
    gathered = gather_from_sequence_parallel_region(e.detach(), tensor_parallel_output_grad=False)
    return {"y": y.detach(), "dx": x.grad, "col_dw": col.weight.grad, "col_db": col.bias.grad,
            "row_dw": row.weight.grad, "row_db": row.bias.grad, "emb": e.detach(), "emb_gathered": gathered,
            "row_bias_marked": row.bias.sequence_parallel}


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_column_row_matches_tp1(tp, tmp_path):
    results = run_distributed(_sequence_parallel_on_rank, tp, tp, tmp_dir=tmp_path)
    d = _data()
    w1, w2 = _full_weight((FFN, HID)), None
    torch.manual_seed(SEED + 1)
    w2 = torch.nn.init.normal_(torch.empty(HID, FFN), 0.0, 0.3)
    x, w1, b1, w2, b2 = (t.clone().requires_grad_() for t in (d["x_h"], w1, d["b_f"], w2, d["b_h"]))
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    y.backward(d["gy_h"])

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([r[key] for r in results], dim=dim)

    torch.testing.assert_close(cat("y", 0), y.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(cat("dx", 0), x.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(cat("col_dw", 0), w1.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(cat("col_db", 0), b1.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(cat("row_dw", 1), w2.grad, atol=ATOL, rtol=0)
    # Each rank adds the row bias to its own tokens: the partial grads sum to the full one.
    torch.testing.assert_close(sum(r["row_db"] for r in results), b2.grad, atol=ATOL, rtol=0)
    assert all(r["row_bias_marked"] for r in results)

    emb_ref = F.embedding(d["ids"], _full_weight((VOCAB, HID))).transpose(0, 1)  # [s, b, h]
    torch.testing.assert_close(cat("emb", 0), emb_ref, atol=ATOL, rtol=0)
    for r in results:
        torch.testing.assert_close(r["emb_gathered"], emb_ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- single-process checks
def test_skip_bias_add_and_tied_weight_forward():
    cfg = _config(1)
    col = ColumnParallelLinear(HID, FFN, config=cfg, init_method=cfg.init_method, skip_bias_add=True)
    x = torch.randn(SEQ, BATCH, HID)
    y, bias = col(x)
    assert bias is col.bias
    torch.testing.assert_close(y, F.linear(x, col.weight))

    out = ColumnParallelLinear(HID, VOCAB, config=cfg, init_method=cfg.init_method, bias=False,
                               skip_weight_param_allocation=True)
    assert out.weight is None and list(out.state_dict()) == []
    tied = torch.randn(VOCAB, HID)
    torch.testing.assert_close(out(x, weight=tied)[0], F.linear(x, tied))
    with pytest.raises(TensorParallelError, match=r"skip_weight_param_allocation"):
        out(x)
    with pytest.raises(TensorParallelError, match=r"\(24, 16\)"):
        out(x, weight=torch.randn(VOCAB + 1, HID))


def test_params_dtype_and_no_init():
    cfg = TransformerConfig(num_layers=1, hidden_size=HID, num_attention_heads=4, params_dtype="bfloat16")
    torch.manual_seed(7)
    col = ColumnParallelLinear(HID, FFN, config=cfg, init_method=cfg.init_method)
    torch.manual_seed(7)
    full = cfg.init_method(torch.empty(FFN, HID))  # the fp32 draw every TP rank makes, then casts
    assert col.weight.dtype == col.bias.dtype == torch.bfloat16
    assert torch.equal(full.to(torch.bfloat16), col.weight.data) and not col.bias.any()
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0


def test_vocab_not_divisible_by_tp_names_both(tmp_path):
    with pytest.raises(Exception, match=r"vocabulary size 25 .*tensor-parallel size 2"):
        run_distributed(_embedding_with_bad_vocab, 2, tmp_dir=tmp_path)


def _embedding_with_bad_vocab() -> None:
    ps.initialize_model_parallel(2)
    cfg = _config(2)
    VocabParallelEmbedding(25, HID, init_method=cfg.init_method, config=cfg)


def test_fits_mlp_builder_protocols():
    """The layers accept exactly the constructor calls MLP makes (LinearFc1Builder / LinearFc2Builder)."""
    cfg = _config(1)
    fc1_call = dict(config=cfg, init_method=cfg.init_method, gather_output=False, bias=True, skip_bias_add=True,
                    is_expert=False, tp_comm_buffer_name="fc1", tp_group=None, stride=2)
    fc2_call = dict(config=cfg, init_method=cfg.output_layer_init_method, bias=True, input_is_parallel=True,
                    skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=None)
    inspect.signature(ColumnParallelLinear).bind(HID, 2 * FFN, **fc1_call)
    inspect.signature(RowParallelLinear).bind(FFN, HID, **fc2_call)
    fc1 = ColumnParallelLinear(HID, 2 * FFN, **fc1_call)
    fc2 = RowParallelLinear(FFN, HID, **fc2_call)
    h, b1 = fc1(torch.randn(SEQ, BATCH, HID))
    y, b2 = fc2(h[..., :FFN] + b1[:FFN])
    assert y.shape == (SEQ, BATCH, HID) and b2.shape == (HID,)
    check_fits_protocol(ColumnParallelLinear, LinearFc1Builder, "linear_fc1")
    check_fits_protocol(RowParallelLinear, LinearFc2Builder, "linear_fc2")
