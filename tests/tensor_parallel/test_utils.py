"""divide, splits and vocab ranges."""

from __future__ import annotations

import pytest
import torch

from megatron_core.tensor_parallel import (
    TensorParallelError,
    VocabUtility,
    divide,
    split_tensor_along_last_dim,
)


def test_divide_exact_and_error_names_both_numbers():
    assert divide(12, 4) == 3
    with pytest.raises(TensorParallelError, match=r"ffn_hidden_size=10 is not divisible by 4"):
        divide(10, 4, "ffn_hidden_size")
    assert issubclass(TensorParallelError, ValueError)


def test_split_tensor_along_last_dim():
    t = torch.arange(24.0).view(2, 12)
    parts = split_tensor_along_last_dim(t, 3)
    assert [p.shape for p in parts] == [(2, 4)] * 3
    assert torch.equal(torch.cat(parts, dim=-1), t)
    assert all(p.is_contiguous() for p in split_tensor_along_last_dim(t, 3, contiguous_split_chunks=True))
    with pytest.raises(TensorParallelError, match="12 is not divisible by 5"):
        split_tensor_along_last_dim(t, 5)


def test_vocab_ranges_tile_the_vocabulary():
    ranges = [VocabUtility.vocab_range_from_global_vocab_size(24, r, 4) for r in range(4)]
    assert ranges == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert VocabUtility.vocab_range_from_per_partition_vocab_size(6, 2, 4) == (12, 18)
    with pytest.raises(TensorParallelError, match="vocab size=25 is not divisible by 4"):
        VocabUtility.vocab_range_from_global_vocab_size(25, 0, 4)
