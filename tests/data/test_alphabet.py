import torch

from megatron_core.data import AlphabetDataset, AlphabetTokenizer


def test_tokenizer_ids_and_padded_vocab():
    tok = AlphabetTokenizer()
    assert tok.vocab_size == 32 and tok.num_real_tokens == 29
    assert tok.encode("abz") == [3, 4, 28]
    assert tok.decode([1, 3, 4, 28, 2, 0, 31]) == "<bos>abz<eos><pad><unk>"
    assert tok.decode(torch.tensor(tok.encode("hello"))) == "hello"


def test_targets_are_next_letters_and_mask_marks_predictable_ones():
    tok = AlphabetTokenizer()
    ds = AlphabetDataset(200, seq_length=30, seed=3)
    saw_eos = saw_short = False
    for i in range(len(ds)):
        sample = ds[i]
        tokens, labels, mask = sample["tokens"], sample["labels"], sample["loss_mask"]
        assert tokens.shape == labels.shape == mask.shape == (30,)
        assert tokens[0] == tok.bos_id
        assert torch.equal(tokens[1:], labels[:-1])
        for t, y, m in zip(tokens.tolist(), labels.tolist(), mask.tolist(), strict=True):
            if m:
                # letter -> the following letter, or z -> <eos>
                assert 3 <= t <= 28
                assert y == (t + 1 if t < 28 else tok.eos_id)
            elif 3 <= t <= 28:
                assert y == tok.pad_id  # an unmasked letter is only the end of a short run
        text = tok.decode(tokens)
        saw_eos |= "z<eos>" in text
        saw_short |= "z" not in text
        letters = text.replace("<bos>", "").split("<")[0]
        assert letters == "abcdefghijklmnopqrstuvwxyz"[ord(letters[0]) - 97:][:len(letters)]
        assert mask.sum() == len(letters) - 1 + ("z<eos>" in text)
    assert saw_eos and saw_short


def test_samples_are_deterministic_and_seeds_differ():
    a = AlphabetDataset(50, 16, seed=1)
    b = AlphabetDataset(50, 16, seed=1)
    c = AlphabetDataset(50, 16, seed=2)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(50))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))
