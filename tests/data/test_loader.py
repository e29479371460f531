import torch

from megatron_core.data import AlphabetDataset, MicroBatchIterator


def test_resume_and_data_parallel_split_reproduce_the_global_order():
    ds = AlphabetDataset(23, 8, seed=0)
    straight = MicroBatchIterator(ds, 4, seed=5)
    batches = [next(straight) for _ in range(10)]  # crosses epochs
    resumed = MicroBatchIterator(ds, 4, seed=5, consumed_samples=6 * 4)
    for b in batches[6:]:
        assert torch.equal(next(resumed)["tokens"], b["tokens"])
    # Two DP ranks with micro-batch 2 together consume what one rank with micro-batch 4 does.
    ranks = [MicroBatchIterator(ds, 2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for b in batches[:5]:
        joined = torch.cat([next(it)["tokens"] for it in ranks])
        assert torch.equal(joined, b["tokens"])
    assert batches[0]["position_ids"][1].tolist() == list(range(8))
