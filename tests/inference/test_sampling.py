import pytest
import torch

from megatron_core.inference import InferenceParams, SamplingParams, filter_logits, sample


def test_filter_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2)[0, 2:].tolist() == [inf, inf, inf]
    # 0.5 + 0.2 = 0.7 < 0.8, so the third token is still needed; the fourth is not.
    kept = filter_logits(logits, top_p=0.8)[0]
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).tolist() == [True, False, False, False, False]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # filtering is by value, not position
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8)[0]).tolist() == [False, True, False, True, True]


def test_sample_greedy_and_seeded():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    a = sample(logits, params, torch.Generator().manual_seed(3))
    b = sample(logits, params, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top10 = torch.topk(logits, 10).indices
    assert all(a[i] in top10[i] for i in range(4))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_inference_params_offsets():
    p = InferenceParams(2, 8)
    p.advance(5)
    p.advance(3)
    assert p.sequence_len_offset == 8
    with pytest.raises(ValueError, match="max_sequence_length=8"):
        p.advance(1)
    p.reset()
    assert p.sequence_len_offset == 0 and p.key_value_memory_dict == {}
