"""Deterministic, resumable micro-batches, split over data-parallel ranks.

The order of samples is a pure function of ``(seed, epoch)``; the position in that order is the
number of samples consumed so far. A run resumed at ``consumed_samples`` therefore sees exactly
the batches the uninterrupted run would have seen, without saving any loader state.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch and add ``position_ids`` ``[b, s]``."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    b, s = batch["tokens"].shape
    batch["position_ids"] = torch.arange(s).unsqueeze(0).expand(b, s)
    return batch


class MicroBatchIterator(Iterator[dict[str, torch.Tensor]]):
    """Endless iterator of micro-batches ``{tokens, labels, loss_mask, position_ids}``, each ``[b, s]``.

    Every step consumes ``micro_batch_size * dp_size`` samples of the global order; data-parallel
    rank ``r`` takes the ``r``-th block. Tensor-parallel ranks of one replica share ``dp_rank`` and
    therefore see identical batches (which tensor parallelism requires).

    Args:
        dataset: map-style dataset returning dicts of equally shaped tensors.
        micro_batch_size: samples per rank per micro-batch.
        dp_rank: this rank's data-parallel rank.
        dp_size: number of data-parallel replicas.
        shuffle: a fresh permutation every epoch (seeded), else sequential order.
        seed: permutation seed.
        consumed_samples: global samples already consumed (resume point).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True, seed: int = 0, consumed_samples: int = 0) -> None:
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise ValueError("MicroBatchIterator: the dataset is empty")
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed = shuffle, seed
        self.consumed_samples = consumed_samples
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._order = torch.randperm(self.num_samples, generator=gen)
            self._epoch = epoch
        assert self._order is not None
        return int(self._order[offset])

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[self._index(p)] for p in range(first, first + self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return collate(samples)
