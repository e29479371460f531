from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_core.data import ByteTokenizer, pad_vocab_size


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_specials_and_vocab_padding():
    tok = ByteTokenizer()
    assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
    assert tok.decode([104, 105, tok.eos_id], keep_special=True) == "hi<eos>"
    assert tok.decode([0xC3]) == "\ufffd"  # half a character decodes, does not raise
    assert pad_vocab_size(29, 8) == 32 and pad_vocab_size(32, 8) == 32 and pad_vocab_size(50257, 128) == 50304
