"""The alphabet task: learn that after ``h`` comes ``i``.

Each sample is ``<bos>`` followed by a run of consecutive letters from a random start letter and of
a random length, then ``<eos>`` when the run reached ``z``, then padding::

    <bos> h i j k <pad> <pad> ...        (stopped before z: no <eos>)
    <bos> w x y z <eos> <pad> ...        (reached z: <eos> follows)

Targets are the next tokens. Only targets that follow from the input are trained on (and scored):
the letter after a letter, and ``<eos>`` after ``z``. The first letter (a free choice) and the
padding carry no loss. A model that solves the task therefore reaches 100% accuracy.

Samples are a pure function of (seed, index), so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import string

import torch

from megatron_core.data.tokenizer import pad_vocab_size

LETTERS = string.ascii_lowercase


class AlphabetTokenizer:
    """26 letters plus ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2); letters are ids 3..28.

    ``vocab_size`` is the padded size (a multiple of ``pad_to``) so that TP=2/4/8 divide it.
    """

    PAD, BOS, EOS = 0, 1, 2
    special_tokens = ("<pad>", "<bos>", "<eos>")

    def __init__(self, pad_to: int = 8) -> None:
        self.num_real_tokens = len(self.special_tokens) + len(LETTERS)
        self.vocab_size = pad_vocab_size(self.num_real_tokens, pad_to)

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    def encode(self, text: str) -> list[int]:
        """Letters to ids; anything that is not a lowercase letter raises ``ValueError``."""
        ids = []
        for char in text:
            if char not in LETTERS:
                raise ValueError(f"alphabet tokenizer: {char!r} in {text!r} is not a lowercase letter a-z")
            ids.append(len(self.special_tokens) + LETTERS.index(char))
        return ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Ids to text; special tokens print as ``<bos>`` etc., padded ids as ``<unk>``."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i < len(self.special_tokens):
                out.append(self.special_tokens[i])
            elif i < self.num_real_tokens:
                out.append(LETTERS[i - len(self.special_tokens)])
            else:
                out.append("<unk>")
        return "".join(out)

    def is_letter(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that are letters."""
        return (ids >= len(self.special_tokens)) & (ids < self.num_real_tokens)


class AlphabetDataset(torch.utils.data.Dataset):
    """``num_samples`` alphabet runs of fixed length ``seq_length`` (see the module docstring).

    Args:
        num_samples: dataset length (any size: samples are generated on demand).
        seq_length: tokens per sample (inputs and labels each have this length).
        seed: different seeds give disjoint-looking streams (use one per split).
        min_letters: shortest run.
        max_letters: longest run (capped by the alphabet and by ``seq_length - 1``).
    """

    def __init__(self, num_samples: int, seq_length: int, seed: int = 0, min_letters: int = 2,
                 max_letters: int = 26, tokenizer: AlphabetTokenizer | None = None) -> None:
        if seq_length < 3:
            raise ValueError(f"AlphabetDataset: seq_length={seq_length} must be >= 3 (<bos>, a letter, a target)")
        if not 1 <= min_letters <= max_letters:
            raise ValueError(f"AlphabetDataset: need 1 <= min_letters ({min_letters}) <= max_letters ({max_letters})")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.seed = seed
        self.min_letters = min_letters
        self.max_letters = min(max_letters, len(LETTERS), seq_length - 1)
        self.tokenizer = tokenizer or AlphabetTokenizer()

    def __len__(self) -> int:
        return self.num_samples

    def sequence(self, index: int) -> list[int]:
        """The unpadded token ids of sample ``index``: <bos>, the letters, and <eos> after z."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = int(torch.randint(0, len(LETTERS), (1,), generator=gen))
        longest = min(self.max_letters, len(LETTERS) - start)
        shortest = min(self.min_letters, longest)
        length = int(torch.randint(shortest, longest + 1, (1,), generator=gen))
        letters = LETTERS[start:start + length]
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(letters)]
        if letters.endswith("z") and len(ids) < self.seq_length + 1:
            ids.append(self.tokenizer.eos_id)
        return ids

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"AlphabetDataset index {index} out of range [0, {self.num_samples})")
        ids = self.sequence(index)
        full = torch.full((self.seq_length + 1,), self.tokenizer.pad_id, dtype=torch.long)
        full[:len(ids)] = torch.tensor(ids[:self.seq_length + 1])
        tokens, labels = full[:-1], full[1:]
        # A target is predictable only when the input is a letter and the target is not padding.
        loss_mask = self.tokenizer.is_letter(tokens) & (labels != self.tokenizer.pad_id)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask.float()}
