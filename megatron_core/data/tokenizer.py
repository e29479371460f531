"""A byte-level tokenizer: any text file can be trained on, nothing to download.

Ids 0..255 are the UTF-8 bytes; ``<pad>``, ``<bos>`` and ``<eos>`` follow (256, 257, 258). The
vocabulary is padded to a multiple of ``pad_to`` so that tensor-parallel sizes divide it; padded
ids never occur in data and decode to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable


def pad_vocab_size(num_tokens: int, multiple: int = 8) -> int:
    """``num_tokens`` rounded up to a multiple of ``multiple`` (so TP sizes divide the vocab)."""
    if multiple < 1:
        raise ValueError(f"pad_vocab_size: multiple={multiple} must be >= 1")
    return -(-num_tokens // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes plus three special tokens.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.decode(tok.encode("héllo"))
        'héllo'
    """

    special_tokens = ("<pad>", "<bos>", "<eos>")

    def __init__(self, pad_to: int = 8) -> None:
        self.num_real_tokens = 256 + len(self.special_tokens)
        self.vocab_size = pad_vocab_size(self.num_real_tokens, pad_to)

    @property
    def pad_id(self) -> int:
        return 256

    @property
    def bos_id(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 258

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text to ids (its UTF-8 bytes), optionally wrapped in <bos> ... <eos>."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Ids to text. Invalid UTF-8 (a sampled half character) decodes as U+FFFD."""
        out = bytearray()
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif keep_special and i < self.num_real_tokens:
                pieces.append(out.decode("utf-8", errors="replace"))
                pieces.append(self.special_tokens[i - 256])
                out = bytearray()
        pieces.append(out.decode("utf-8", errors="replace"))
        return "".join(pieces)
