"""Decoders over a table-driven step function, so the expected outputs are known by hand."""
import numpy as np
import pytest

from captioner.core.decoding import DecodeParams, beam_search, decode, greedy, log_softmax, sample

BOS, EOS, V = 1, 2, 8


class TableStep:
    """Next-token distribution depends on (row's original id, tokens so far)."""

    def __init__(self, table, batch):
        self.table, self.rows, self.hist = table, np.arange(batch), [[] for _ in range(batch)]
        self.calls = []

    def __call__(self, tokens):
        self.calls.append(len(tokens))
        out = np.full((len(tokens), V), -30.0, dtype=np.float32)
        for r, tok in enumerate(tokens):
            if tok != BOS:
                self.hist[r] = self.hist[r] + [int(tok)]
            for nxt, p in self.table(int(self.rows[r]), tuple(self.hist[r])).items():
                out[r, nxt] = np.log(p)
        return log_softmax(out)

    def select(self, rows):
        self.rows = self.rows[rows]
        self.hist = [list(self.hist[i]) for i in rows]


def lengths_table(row, hist):
    # row r emits tokens 3,4,5,... and stops after r+1 tokens
    return {EOS: 0.9} if len(hist) > row else {3 + len(hist): 0.9}


def test_greedy_rows_finish_at_different_steps_and_leave_the_batch():
    step = TableStep(lengths_table, 3)
    out = greedy(step, 3, BOS, EOS, max_new_tokens=10)
    assert out == [[3], [3, 4], [3, 4, 5]]
    assert step.calls == [3, 3, 2, 1]  # finished rows are dropped from the batch


def test_max_new_tokens_caps_length():
    out = greedy(TableStep(lambda r, h: {5: 0.9}, 2), 2, BOS, EOS, max_new_tokens=4)
    assert out == [[5, 5, 5, 5]] * 2


def garden_path(row, hist):
    # greedy takes 3 (p=.6) then faces a flat distribution; 4 (p=.4) leads to a sure 6 then EOS
    if hist == ():
        return {3: 0.6, 4: 0.4}
    if hist == (3,):
        return {5: 0.25, 6: 0.25, 7: 0.25, EOS: 0.25}
    if hist == (4,):
        return {6: 1.0}
    return {EOS: 1.0}


def test_beam_search_beats_greedy_on_a_garden_path():
    assert greedy(TableStep(garden_path, 1), 1, BOS, EOS, 5)[0][0] == 3
    out = beam_search(TableStep(garden_path, 2), 2, BOS, EOS, 5, beam_size=3, length_penalty=0.0)
    assert out == [[4, 6], [4, 6]]


def test_beam_size_one_equals_greedy():
    g = greedy(TableStep(lengths_table, 3), 3, BOS, EOS, 10)
    b = beam_search(TableStep(lengths_table, 3), 3, BOS, EOS, 10, beam_size=1)
    assert g == b


def test_no_repeat_ngram_blocking():
    rep = lambda r, h: {5: 0.6, 6: 0.3, EOS: 0.1}  # noqa: E731
    assert greedy(TableStep(rep, 1), 1, BOS, EOS, 4) == [[5, 5, 5, 5]]
    out = greedy(TableStep(rep, 1), 1, BOS, EOS, 4, no_repeat_ngram_size=1)
    assert out == [[5, 6]]  # 5 and 6 used once each, then only EOS is left
    out = beam_search(TableStep(rep, 1), 1, BOS, EOS, 6, beam_size=2, no_repeat_ngram_size=2)
    seq = out[0]
    assert len({tuple(seq[i:i + 2]) for i in range(len(seq) - 1)}) == len(seq) - 1


def test_sampling_top_p_and_seed():
    tbl = lambda r, h: {EOS: 1.0} if h else {3: 0.5, 4: 0.3, 5: 0.15, 6: 0.05}  # noqa: E731
    draws = [sample(TableStep(tbl, 50), 50, BOS, EOS, 3, top_p=0.7, seed=s) for s in range(4)]
    firsts = {seq[0] for d in draws for seq in d}
    assert firsts == {3, 4}  # top_p=0.7 keeps only the 0.5 and 0.3 tokens
    assert draws[0] == sample(TableStep(tbl, 50), 50, BOS, EOS, 3, top_p=0.7, seed=0)
    wide = sample(TableStep(tbl, 200), 200, BOS, EOS, 3, top_p=1.0, seed=1)
    assert {s[0] for s in wide} == {3, 4, 5, 6}


def test_decode_dispatch():
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        decode(TableStep(lengths_table, 1), 1, BOS, EOS, DecodeParams(strategy="nope"))
    assert decode(TableStep(lengths_table, 2), 2, BOS, EOS, DecodeParams(strategy="beam", beam_size=2)) == [[3], [3, 4]]
