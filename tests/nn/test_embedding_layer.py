"""EmbeddingLayer (every position type), sinusoidal positions, relative buckets, unsupported arguments."""

from __future__ import annotations

import math

import pytest
import torch

import megatron_core.nn as mnn
from megatron_core.transformer.positions import SinusoidalPositionEmbedding, relative_position_bucket

V, H, P = 20, 8, 12


def test_learned_and_fixed_positions():
    ids = torch.randint(0, V, (2, 5))
    learned = mnn.EmbeddingLayer(V, H, "learned", max_position_embeddings=P, num_segments=2)
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    expected = (learned.word_embeddings(ids) + learned.position_embeddings(torch.arange(5))
                + learned.segment_embeddings(segments))
    assert torch.equal(learned(ids, segment_ids=segments), expected)
    assert set(learned.state_dict()) == {"word_embeddings.weight", "position_embeddings.weight",
                                         "segment_embeddings.weight"}
    fixed = mnn.EmbeddingLayer(V, H, "fixed", max_position_embeddings=P)
    shifted = fixed(ids, past_length=3) - fixed.word_embeddings(ids)
    assert torch.allclose(shifted[0], fixed.position_embeddings(torch.arange(3, 8)))
    assert set(fixed.state_dict()) == {"word_embeddings.weight"}  # the sinusoid table is not a checkpoint key


def test_sinusoidal_table_is_the_tutorials():
    d, n = 6, 10
    position = torch.arange(n).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    reference = torch.zeros(n, d)
    reference[:, 0::2] = torch.sin(position * div_term)
    reference[:, 1::2] = torch.cos(position * div_term)
    assert torch.equal(SinusoidalPositionEmbedding(d, n)(torch.arange(n)), reference)
    assert SinusoidalPositionEmbedding(5, n)(torch.arange(3)).shape == (3, 5)  # odd width
    with pytest.raises(ValueError, match="beyond the table"):
        SinusoidalPositionEmbedding(d, n)(torch.tensor([n]))


def test_rotary_relative_and_none():
    ids = torch.randint(0, V, (2, 5))
    rotary = mnn.EmbeddingLayer(V, H, "rotary", num_heads=2)
    assert torch.equal(rotary(ids), rotary.word_embeddings(ids))
    assert rotary.rotary_angles(5).shape == (5, 1, 1, H // 2)
    relative = mnn.EmbeddingLayer(V, H, "relative", num_heads=2, num_relative_attention_buckets=8,
                                  max_relative_distance=16)
    bias = relative.compute_position_bias(5, 7)
    assert bias.shape == (1, 2, 5, 7)
    table = relative.relative_position_bias.relative_attention_bias.weight  # [buckets, heads]
    assert torch.equal(bias[0, :, 2, 2], table[0])  # distance 0 -> bucket 0
    plain = mnn.EmbeddingLayer(V, H, None)
    assert torch.equal(plain(ids), plain.word_embeddings(ids))
    with pytest.raises(ValueError, match="rotary"):
        plain.rotary_angles(5)


def test_relative_buckets():
    distance = torch.arange(-6, 7)
    both = relative_position_bucket(distance, bidirectional=True, num_buckets=8, max_distance=16)
    assert both[6] == 0 and both[7] == 5 and both[5] == 1  # 0; +1 uses the upper half; -1
    assert (both[distance > 0] >= 4).all() and (both[distance < 0] < 4).all()
    past = relative_position_bucket(distance, bidirectional=False, num_buckets=8, max_distance=16)
    assert (past[distance >= 0] == 0).all() and int(past.max()) <= 7


def test_clear_errors():
    with pytest.raises(ValueError, match=r"position_embedding_type='alibi' is not known.*learned"):
        mnn.EmbeddingLayer(V, H, "alibi", max_position_embeddings=P)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mnn.EmbeddingLayer(V, H, "learned")
    with pytest.raises(ValueError, match="num_heads"):
        mnn.EmbeddingLayer(V, H, "relative")
    for kwargs in ({"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 4}, {"vdim": 4}):
        with pytest.raises(mnn.UnsupportedArgumentError, match=next(iter(kwargs))):
            mnn.MultiheadAttention(H, 2, **kwargs)
    with pytest.raises(ValueError, match="swiglu.*gated"):
        mnn.TransformerEncoderLayer(H, 2, 16, activation="swiglu")
    with pytest.raises(TypeError, match="TransformerEncoderLayer"):
        mnn.TransformerEncoder(torch.nn.Linear(2, 2), 2)
