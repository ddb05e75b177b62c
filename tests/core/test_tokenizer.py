import pytest

from captioner.core.tokenizer import BOS_ID, EOS_ID, PAD_ID, CaptionTokenizer

CAPS = ["A red circle on the left .", "A blue square at the top .", "Two dogs play in the snow ."] * 3


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_roundtrip_and_specials(kind):
    tok = CaptionTokenizer.train(CAPS, kind=kind, vocab_size=300)
    ids = tok.encode("A red circle on the left .", max_len=32)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and PAD_ID not in ids
    assert tok.decode(ids + [PAD_ID, 7]) == "a red circle on the left ."
    again = CaptionTokenizer.from_str(tok.to_str())
    assert again.encode("two dogs", 8) == tok.encode("two dogs", 8)
    assert len(tok.encode("a " * 50, max_len=10)) == 10


def test_unknown_words_map_to_unk():
    tok = CaptionTokenizer.train(CAPS, kind="wordlevel")
    ids = tok.encode("a zebra", 8)
    assert ids[2] == tok.unk_id
