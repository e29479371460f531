"""Learned absolute positions: one table for the models and the ``nn`` facade, init independent of TP/dtype."""

from __future__ import annotations

import torch

import megatron_core.nn as mnn
from megatron_core.config import TransformerConfig
from megatron_core.models.common.embeddings import LanguageModelEmbedding
from megatron_core.transformer.positions import LearnedPositionEmbedding, RotaryEmbedding


def test_table_is_the_fp32_draw_cast_and_looks_up_rows():
    torch.manual_seed(3)
    table = LearnedPositionEmbedding(10, 6, torch.nn.init.normal_, torch.bfloat16)
    torch.manual_seed(3)
    reference = torch.nn.init.normal_(torch.empty(10, 6)).to(torch.bfloat16)
    assert table.weight.dtype == torch.bfloat16 and torch.equal(table.weight, reference)
    ids = torch.tensor([[0, 3], [9, 9]])
    assert torch.equal(table(ids), reference[ids])
    assert set(table.state_dict()) == {"weight"}
    assert torch.equal(LearnedPositionEmbedding(4, 2, perform_initialization=False).weight, torch.zeros(4, 2))


def test_models_and_nn_facade_share_the_table():
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, init_method_std=0.5)
    torch.manual_seed(0)
    embedding = LanguageModelEmbedding(config, vocab_size=16, max_sequence_length=12)
    assert isinstance(embedding.position_embeddings, LearnedPositionEmbedding)
    assert "position_embeddings.weight" in embedding.state_dict()  # Megatron-Core's key
    layer = mnn.EmbeddingLayer(16, 8, "learned", max_position_embeddings=12)
    assert isinstance(layer.position_embeddings, LearnedPositionEmbedding)
    assert float(layer.position_embeddings.weight.std()) > 0.5  # torch.nn.Embedding's N(0, 1)


def test_rotary_angles_for_explicit_positions_are_table_rows():
    rope = RotaryEmbedding(8, rotary_percent=0.5, seq_len_interpolation_factor=2.0)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 0, 1]])  # [b, s]: a shifted row and a packed one
    angles = rope.angles_for_positions(positions)  # [s, b, 1, rot]
    table = rope(7)  # [7, 1, 1, rot]
    assert angles.shape == (4, 2, 1, 4)
    for b in range(2):
        for s in range(4):
            assert torch.equal(angles[s, b, 0], table[positions[b, s], 0, 0])
