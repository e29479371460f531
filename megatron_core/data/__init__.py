"""Datasets for training: the alphabet task, memory-mapped indexed token data, packing, batching."""

from megatron_core.data.alphabet import AlphabetDataset, AlphabetTokenizer
from megatron_core.data.hf_tokenizer import HFTokenizer, TokenizerError
from megatron_core.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_dtype,
)
from megatron_core.data.loader import MicroBatchIterator, collate
from megatron_core.data.packing import PackedSequenceDataset, split_train_valid
from megatron_core.data.text_build import build_from_text
from megatron_core.data.tokenizer import ByteTokenizer, pad_vocab_size

__all__ = [
    "AlphabetDataset",
    "AlphabetTokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "MicroBatchIterator",
    "PackedSequenceDataset",
    "TokenizerError",
    "best_dtype",
    "build_from_text",
    "collate",
    "pad_vocab_size",
    "split_train_valid",
]
