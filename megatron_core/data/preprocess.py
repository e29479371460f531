"""Turn local text files into an indexed dataset: ``python -m megatron_core.data.preprocess``.

Example::

    python -m megatron_core.data.preprocess --input notes.txt book.txt --output-prefix data/mytext

writes ``data/mytext.bin`` and ``data/mytext.idx``: one document per file (or per blank-line
separated paragraph with ``--split-paragraphs``), byte-tokenized, each ending in ``<eos>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from megatron_core import cli
from megatron_core.data.hf_tokenizer import HFTokenizer, TokenizerError
from megatron_core.data.indexed_dataset import IndexedDatasetError
from megatron_core.data.text_build import build_from_text

__all__ = ["build_from_text", "main"]


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
