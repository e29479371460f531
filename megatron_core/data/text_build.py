"""Tokenize local text files into Megatron's indexed dataset format (``build_from_text``).

The command line is ``python -m megatron_core.data.preprocess``; this module is kept apart from it so that
importing ``megatron_core.data`` does not import the command's module (``python -m`` would warn).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from megatron_core.data.hf_tokenizer import HFTokenizer
from megatron_core.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_core.data.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)


def _documents(paths: Iterable[str | Path], split_paragraphs: bool) -> Iterable[str]:
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if split_paragraphs:
            yield from (p.strip("\n") for p in text.split("\n\n") if p.strip())
        elif text:
            yield text


def build_from_text(paths: Sequence[str | Path], output_prefix: str | Path,
                    tokenizer: ByteTokenizer | HFTokenizer | None = None, split_paragraphs: bool = False) -> Path:
    """Tokenize ``paths`` (bytes by default) into ``output_prefix.bin/.idx`` (Megatron's format); returns the prefix.

    Raises:
        FileNotFoundError: an input file does not exist (named in the message).
    """
    tokenizer = tokenizer or ByteTokenizer()
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"text file {path} not found")
    num_docs = num_tokens = 0
    with IndexedDatasetBuilder(output_prefix, dtype=best_dtype(tokenizer.vocab_size)) as builder:
        for doc in _documents(paths, split_paragraphs):
            ids = np.asarray(tokenizer.encode(doc, add_eos=True))
            builder.add_document(ids)
            num_docs += 1
            num_tokens += len(ids)
    logger.info("wrote %s.bin/.idx: %d documents, %d tokens", output_prefix, num_docs, num_tokens)
    return Path(output_prefix)
