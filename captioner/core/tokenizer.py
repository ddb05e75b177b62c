"""Caption tokenizer on the HF `tokenizers` library (WordLevel or byte-level BPE).

Trained on training-split captions only; serialised as one JSON string (`tokenizer.json`)
that travels inside checkpoints and the exported Triton repository.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIALS = [PAD, BOS, EOS, UNK]  # trainers assign ids in this order: 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class CaptionTokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        for name, want in zip(SPECIALS, (PAD_ID, BOS_ID, EOS_ID, UNK_ID)):
            got = tok.token_to_id(name)
            if got != want:
                raise ValueError(f"tokenizer special token {name} has id {got}, expected {want}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    @classmethod
    def train(cls, captions: Iterable[str], kind: str = "wordlevel", vocab_size: int = 10000,
              min_freq: int = 1) -> "CaptionTokenizer":
        norm = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        if kind == "wordlevel":
            tok = Tokenizer(models.WordLevel(unk_token=UNK))
            tok.normalizer = norm
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_freq,
                                                special_tokens=SPECIALS)
        elif kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token=UNK))
            tok.normalizer = norm
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_freq, special_tokens=SPECIALS,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r} (wordlevel|bpe)")
        tok.train_from_iterator(list(captions), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> "CaptionTokenizer":
        return cls(Tokenizer.from_str(s))

    @classmethod
    def from_file(cls, path: str | Path) -> "CaptionTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, max_len: int) -> list[int]:
        """BOS w1 .. wk EOS, truncated so the whole sequence fits in max_len (EOS kept)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return [self.bos_id, *ids, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(i)
        return self.tok.decode(out, skip_special_tokens=True).strip()
