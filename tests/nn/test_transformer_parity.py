"""Drop-in transformer layers vs torch.nn at TP=1: outputs, input grads and parameter grads within 1e-6.

Each drop-in layer loads the torch.nn layer's ``state_dict()`` as is, then both run the same inputs
over every combination of ``batch_first``, ``norm_first``, mask kind and activation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import megatron_core.nn as mnn
from tests.nn.helpers import check_parity

# torch warns when a float attn_mask meets a bool key_padding_mask; mixing them is part of the matrix.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")

D, H, FF, L, S, N = 16, 4, 24, 5, 6, 3
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.gelu": F.gelu, "GELU(tanh)": torch.nn.GELU(approximate="tanh")}
MASKS = ["none", "bool", "float", "per_head_float", "padding", "bool+padding", "float+padding", "causal",
         "causal_hint_only"]


def _masks(kind: str, sq: int, sk: int, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """(attn_mask, key_padding_mask, is_causal) of ``kind``; no query row is fully masked."""
    allowed_diag = torch.eye(sq, sk, dtype=torch.bool)
    bool_mask = (torch.rand(sq, sk, generator=gen) < 0.3) & ~allowed_diag
    float_mask = torch.randn(sq, sk, generator=gen).masked_fill(bool_mask, float("-inf"))
    padding = torch.zeros(N, sk, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    causal = torch.zeros(sq, sk).masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
    return {
        "none": (None, None, False),
        "bool": (bool_mask, None, False),
        "float": (float_mask, None, False),
        "per_head_float": (torch.randn(N * H, sq, sk, generator=gen), None, False),
        "padding": (None, padding, False),
        "bool+padding": (bool_mask, padding, False),
        "float+padding": (float_mask, padding.float().masked_fill(padding, float("-inf")), False),
        "causal": (causal, None, True),
        "causal_hint_only": (causal, padding, False),
    }[kind]


def _layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1).contiguous()  # inputs are drawn [N, L, E]


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product([True, False], [True, False])))
def test_encoder_layer_matches_torch(batch_first, norm_first):
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for act, kind in itertools.product(ACTIVATIONS.values(), MASKS):
        theirs = torch.nn.TransformerEncoderLayer(D, H, FF, 0.0, act, batch_first=batch_first, norm_first=norm_first)
        ours = mnn.TransformerEncoderLayer(D, H, FF, 0.0, act, batch_first=batch_first, norm_first=norm_first)
        attn_mask, padding, is_causal = _masks(kind, L, L, gen)
        x = _layout(torch.randn(N, L, D, generator=gen), batch_first)
        worst = max(worst, check_parity(
            ours, theirs, lambda m, xs, a=attn_mask, p=padding, c=is_causal: m(xs[0], src_mask=a, src_key_padding_mask=p,
                                                                               is_causal=c),
            [x]))
    print(f"encoder layer batch_first={batch_first} norm_first={norm_first}: max diff {worst:.2e}")


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product([True, False], [True, False])))
def test_decoder_layer_matches_torch(batch_first, norm_first):
    gen = torch.Generator().manual_seed(1)
    for act, kind in itertools.product(ACTIVATIONS.values(), MASKS):
        theirs = torch.nn.TransformerDecoderLayer(D, H, FF, 0.0, act, batch_first=batch_first, norm_first=norm_first)
        ours = mnn.TransformerDecoderLayer(D, H, FF, 0.0, act, batch_first=batch_first, norm_first=norm_first)
        tgt_mask, tgt_padding, tgt_causal = _masks(kind, L, L, gen)
        memory_mask, memory_padding, _ = _masks(kind if kind != "causal" else "bool", L, S, gen)
        tgt = _layout(torch.randn(N, L, D, generator=gen), batch_first)
        memory = _layout(torch.randn(N, S, D, generator=gen), batch_first)
        masks = dict(tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_padding,
                     memory_key_padding_mask=memory_padding, tgt_is_causal=tgt_causal)
        check_parity(ours, theirs, lambda m, xs, masks=masks: m(xs[0], xs[1], **masks), [tgt, memory])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("inputs", ["self", "kv_shared", "separate"])
def test_multihead_attention_matches_torch(batch_first, inputs):
    gen = torch.Generator().manual_seed(2)
    for kind, (need_weights, average), bias in itertools.product(
            MASKS, [(False, True), (True, True), (True, False)], [True, False]):
        theirs = torch.nn.MultiheadAttention(D, H, bias=bias, batch_first=batch_first)
        ours = mnn.MultiheadAttention(D, H, bias=bias, batch_first=batch_first)
        sk = L if inputs == "self" else S
        attn_mask, padding, is_causal = _masks(kind, L, sk, gen)
        q = _layout(torch.randn(N, L, D, generator=gen), batch_first)
        kv = _layout(torch.randn(N, sk, D, generator=gen), batch_first)
        v = _layout(torch.randn(N, sk, D, generator=gen), batch_first)

        def call(m, xs, attn_mask=attn_mask, padding=padding, is_causal=is_causal,
                 need_weights=need_weights, average=average):
            query, key, value = {"self": (xs[0], xs[0], xs[0]), "kv_shared": (xs[0], xs[1], xs[1]),
                                 "separate": (xs[0], xs[1], xs[2])}[inputs]
            return m(query, key, value, key_padding_mask=padding, need_weights=need_weights, attn_mask=attn_mask,
                     average_attn_weights=average, is_causal=is_causal and inputs == "self")

        check_parity(ours, theirs, call, [q, kv, v])


@pytest.mark.parametrize("norm_first", [True, False])
def test_stacks_and_transformer_match_torch(norm_first):
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(N, L, D, generator=gen)
    tgt = torch.randn(N, S, D, generator=gen)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(S)
    _, padding, _ = _masks("padding", L, L, gen)
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=True, norm_first=norm_first)

    enc_t = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(D, H, **kw), 2, torch.nn.LayerNorm(D),
                                        enable_nested_tensor=False)
    enc_o = mnn.TransformerEncoder(mnn.TransformerEncoderLayer(D, H, **kw), 2, torch.nn.LayerNorm(D))
    check_parity(enc_o, enc_t, lambda m, xs: m(xs[0], src_key_padding_mask=padding), [src])

    dec_t = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(D, H, **kw), 2, torch.nn.LayerNorm(D))
    dec_o = mnn.TransformerDecoder(mnn.TransformerDecoderLayer(D, H, **kw), 2, torch.nn.LayerNorm(D))
    check_parity(dec_o, dec_t, lambda m, xs: m(xs[0], xs[1], tgt_mask=tgt_mask, tgt_is_causal=True,
                                               memory_key_padding_mask=padding), [tgt, src])

    full_t = torch.nn.Transformer(D, H, 2, 2, **kw)
    full_o = mnn.Transformer(D, H, 2, 2, **kw)
    check_parity(full_o, full_t, lambda m, xs: m(xs[0], xs[1], tgt_mask=tgt_mask, src_key_padding_mask=padding,
                                                 memory_key_padding_mask=padding), [src, tgt])


def test_same_seed_gives_torch_weights():
    """Built from the same seed, each drop-in layer holds torch.nn's initial weights (after conversion)."""
    for make_t, make_o in [
        (lambda: torch.nn.TransformerEncoderLayer(D, H, FF), lambda: mnn.TransformerEncoderLayer(D, H, FF)),
        (lambda: torch.nn.TransformerDecoderLayer(D, H, FF), lambda: mnn.TransformerDecoderLayer(D, H, FF)),
        (lambda: torch.nn.MultiheadAttention(D, H), lambda: mnn.MultiheadAttention(D, H)),
        (lambda: torch.nn.Transformer(D, H, 1, 1, FF), lambda: mnn.Transformer(D, H, 1, 1, FF)),
    ]:
        torch.manual_seed(11)
        theirs = make_t()
        after_theirs = torch.rand(3)
        torch.manual_seed(11)
        ours = make_o()
        after_ours = torch.rand(3)
        initial = {k: v.clone() for k, v in ours.state_dict().items()}
        ours.load_state_dict(theirs.state_dict())
        for key, value in ours.state_dict().items():
            assert torch.equal(value, initial[key]), key
        assert torch.equal(after_theirs, after_ours), "building the drop-in layer drew a different amount of RNG"


def test_torch_layer_into_our_encoder_and_deepcopy():
    """TransformerEncoder accepts a torch.nn layer (converted, same weights); deepcopy keeps TP tags."""
    torch.manual_seed(5)
    torch_layer = torch.nn.TransformerEncoderLayer(D, H, FF, 0.0, batch_first=True)
    encoder = mnn.TransformerEncoder(torch_layer, 2)
    x = torch.randn(N, L, D)
    assert torch.allclose(encoder.layers[0](x), torch_layer(x), atol=1e-6)
    assert isinstance(encoder.layers[1], mnn.TransformerEncoderLayer) and encoder.norm is None
    twin = torch.nn.TransformerEncoder(torch_layer, 2, enable_nested_tensor=False)
    assert torch.allclose(encoder(x), twin(x), atol=1e-6)
    weight = encoder.layers[0].self_attention.linear_qkv.weight
    assert weight.partition_dim == 0 and weight.tensor_model_parallel


def test_unbatched_inputs_match_torch():
    torch.manual_seed(6)
    theirs = torch.nn.TransformerEncoderLayer(D, H, FF, 0.0)
    ours = mnn.TransformerEncoderLayer(D, H, FF, 0.0)
    padding = torch.zeros(L, dtype=torch.bool)
    padding[-1] = True
    check_parity(ours, theirs, lambda m, xs: m(xs[0], src_key_padding_mask=padding), [torch.randn(L, D)])
    mha_t, mha_o = torch.nn.MultiheadAttention(D, H), mnn.MultiheadAttention(D, H)
    mask = torch.randn(H, L, L)
    check_parity(mha_o, mha_t, lambda m, xs: m(xs[0], xs[0], xs[0], attn_mask=mask, average_attn_weights=False),
                 [torch.randn(L, D)])


def test_bias_false_and_state_dict_keys():
    theirs = torch.nn.TransformerDecoderLayer(D, H, FF, 0.0, bias=False)
    ours = mnn.TransformerDecoderLayer(D, H, FF, 0.0, bias=False)
    gen = torch.Generator().manual_seed(7)
    check_parity(ours, theirs, lambda m, xs: m(xs[0], xs[1]),
                 [torch.randn(L, N, D, generator=gen), torch.randn(S, N, D, generator=gen)])
    keys = set(ours.state_dict())
    assert "cross_attention.linear_kv.weight" in keys and "pre_cross_attn_layernorm.weight" in keys
    assert not any(k.endswith("bias") for k in keys)
    assert set(ours.sharded_state_dict()) == keys
