"""Sequence packing: documents laid end to end, cut into fixed-length training samples.

The documents of an ``IndexedDataset`` (each already ending in ``<eos>`` when built by
``preprocess``) form one token stream. Sample ``i`` is the window
``stream[i * seq_length : (i + 1) * seq_length + 1]``: its first ``seq_length`` tokens are the
inputs, its last ``seq_length`` the labels, so consecutive samples share one token and no token
is wasted. Windows cross document boundaries (as in GPT pre-training); the model learns from
``<eos>`` where a new document begins.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_core.data.indexed_dataset import IndexedDataset


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Fixed-length samples packed from the documents of ``indexed``.

    Args:
        indexed: the documents.
        seq_length: tokens per sample.

    Raises:
        ValueError: the dataset holds fewer than ``seq_length + 1`` tokens.
    """

    def __init__(self, indexed: IndexedDataset, seq_length: int) -> None:
        self.indexed = indexed
        self.seq_length = seq_length
        # doc_starts[d] = position of document d's first token in the stream.
        self.doc_starts = np.zeros(len(indexed) + 1, dtype=np.int64)
        np.cumsum(indexed.sizes, out=self.doc_starts[1:])
        total = int(self.doc_starts[-1])
        if total < seq_length + 1:
            raise ValueError(
                f"{indexed.prefix}: {total} tokens cannot fill one sample of seq_length={seq_length} "
                "(needs seq_length + 1); add text or lower seq_length"
            )
        self.num_samples = (total - 1) // seq_length

    def __len__(self) -> int:
        return self.num_samples

    def window(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` stream tokens of sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"packed sample {index} out of range [0, {self.num_samples})")
        start = index * self.seq_length
        end = start + self.seq_length + 1
        doc = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        pieces = []
        while start < end:
            offset = start - int(self.doc_starts[doc])
            take = min(int(self.indexed.sizes[doc]) - offset, end - start)
            pieces.append(self.indexed.get(doc, offset, take))
            start += take
            doc += 1
        return np.concatenate(pieces)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.window(index).astype(np.int64))
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
        }


def split_train_valid(dataset: torch.utils.data.Dataset, valid_fraction: float,
                      ) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """Contiguous split: the first ``1 - valid_fraction`` of the samples train, the rest validate.

    Contiguous (not shuffled) so that validation text is text the model never trained on.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction} must lie in [0, 1)")
    num_valid = max(1, round(n * valid_fraction)) if valid_fraction > 0 and n > 1 else 0
    train = torch.utils.data.Subset(dataset, range(n - num_valid))
    valid = torch.utils.data.Subset(dataset, range(n - num_valid, n))
    return train, valid
