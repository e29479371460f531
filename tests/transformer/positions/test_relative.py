"""T5 relative position bias: buckets equal Hugging Face's, bias layout, per-head TP sharding metadata."""

from __future__ import annotations

import pytest
import torch

from megatron_core.config import TransformerConfig
from megatron_core.transformer.positions import (
    RelativePositionEmbedding,
    relative_position_bucket,
)

CONFIG = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, init_method_std=0.5)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 32)])
def test_buckets_equal_hugging_face(bidirectional, num_buckets, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    distances = torch.arange(-400, 401)[:, None] + torch.zeros(1, 3, dtype=torch.long)  # 2-D like the real use
    want = t5.T5Attention._relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    got = relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_causal_buckets_ignore_the_future():
    future = torch.arange(0, 50)
    assert torch.equal(relative_position_bucket(future, False, 32, 128), torch.zeros(50, dtype=torch.long))


def test_bias_is_the_table_looked_up_by_bucket():
    module = RelativePositionEmbedding(CONFIG, bidirectional=True, num_buckets=8, max_distance=16)
    bias = module(5, 7)
    assert bias.shape == (1, 4, 5, 7)
    table = module.relative_attention_bias.weight  # [buckets, heads]
    for q, k in [(0, 0), (4, 0), (1, 6), (3, 3)]:
        bucket = relative_position_bucket(torch.tensor(k - q), True, 8, 16)
        torch.testing.assert_close(bias[0, :, q, k], table[bucket], rtol=0, atol=0)


def test_offset_selects_later_query_rows():
    module = RelativePositionEmbedding(CONFIG, bidirectional=False, num_buckets=8, max_distance=16)
    full = module(6, 6)
    step = module(1, 6, offset=5)  # the last query of a cached decoder step
    assert torch.equal(step[:, :, 0], full[:, :, 5])


def test_table_is_split_over_heads_in_the_checkpoint():
    module = RelativePositionEmbedding(CONFIG, bidirectional=True)
    sharded = module.sharded_state_dict(prefix="encoder_relative_pos_emb.")
    sh = sharded["encoder_relative_pos_emb.relative_attention_bias.weight"]
    assert sh.global_shape == (32, 4) and sh.axis_fragmentations == (1, 1)
    assert module.relative_attention_bias.weight.partition_dim == 1  # gathered along heads


def test_bucket_settings_without_log_buckets_are_refused():
    with pytest.raises(ValueError, match="num_buckets=8, max_distance=2"):
        RelativePositionEmbedding(CONFIG, bidirectional=True, num_buckets=8, max_distance=2)
