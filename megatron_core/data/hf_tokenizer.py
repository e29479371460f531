"""Hugging Face ``tokenizers`` (a ``tokenizer.json``) for preprocessing, training and generation.

``data.tokenizer: {kind: hf, path: tokenizer.json}`` in a run YAML, ``--tokenizer tokenizer.json``
for ``python -m megatron_core.data.preprocess``. The ``tokenizers`` library is an optional
dependency (``pip install 'spec-megatron[hf]'``); nothing is downloaded. The vocabulary is padded
to a multiple of ``pad_to`` (so TP sizes divide it); padded ids never occur in data and decode to
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_core.data.tokenizer import pad_vocab_size

#: Special tokens looked up, in order, when the config does not name them.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or lacks a token the toolkit needs."""


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the interface of ``ByteTokenizer``.

    Args:
        path: a ``tokenizer.json`` (Hugging Face ``tokenizers`` format).
        eos_token: the end-of-document token (default: the first of ``EOS_CANDIDATES`` present).
        pad_to: pad the vocabulary size to a multiple of this.

    Raises:
        TokenizerError: missing/unreadable file, no end-of-document token, or ``tokenizers`` absent.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, pad_to: int = 8) -> None:
        self.path = Path(path)
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise TokenizerError("data.tokenizer kind=hf needs the `tokenizers` library: "
                                 "pip install 'spec-megatron[hf]' (or pip install tokenizers)") from err
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} not found; set data.tokenizer.path to a tokenizer.json")
        try:
            self._tok: Any = Tokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust library raises its own Exception type
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({err})") from err
        self.num_real_tokens = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.vocab_size = pad_vocab_size(self.num_real_tokens, pad_to)
        eos = self._find((eos_token,) if eos_token else EOS_CANDIDATES)
        if eos is None:
            raise TokenizerError(f"{self.path}: no end-of-document token among {list(eos_token and [eos_token] or EOS_CANDIDATES)}; "
                                 "set data.tokenizer.eos_token to one of its special tokens")
        self._eos = eos
        self._bos = self._find(BOS_CANDIDATES)
        self._pad = self._find(PAD_CANDIDATES)

    def _find(self, names: Iterable[str]) -> int | None:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int:
        return self._bos if self._bos is not None else self._eos

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad is not None else self._eos

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text to ids (the tokenizer's own post-processing is not applied), optionally wrapped."""
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Ids to text; padded ids (past the real vocabulary) decode to nothing."""
        real = [int(i) for i in ids if int(i) < self.num_real_tokens]
        return str(self._tok.decode(real, skip_special_tokens=not keep_special))
