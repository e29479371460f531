"""Turn local text files into an indexed dataset: ``python -m megatron_core.data.preprocess``.

Example::

    python -m megatron_core.data.preprocess --input notes.txt book.txt --output-prefix data/mytext

writes ``data/mytext.bin`` and ``data/mytext.idx``: one document per file (or per blank-line
separated paragraph with ``--split-paragraphs``), byte-tokenized, each ending in ``<eos>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from megatron_core import cli
from megatron_core.data.hf_tokenizer import HFTokenizer, TokenizerError
from megatron_core.data.indexed_dataset import IndexedDatasetBuilder, IndexedDatasetError, best_dtype
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m megatron_core.data.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--split-paragraphs", action="store_true", help="one document per blank-line paragraph")
    parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer.json (default: UTF-8 bytes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = HFTokenizer(args.tokenizer) if args.tokenizer else None
    build_from_text(args.input, args.output_prefix, tokenizer=tokenizer, split_paragraphs=args.split_paragraphs)


if __name__ == "__main__":
    cli.run(main, user_errors=(IndexedDatasetError, TokenizerError))
