"""Greedy, beam and sampling decoders as pure functions over a *step function*.

A step function owns the decoding state (KV cache) of a batch of rows and has two methods:
  step(tokens [R] int64) -> log-probs [R, V] float32 for the next token of every row
  step.select(rows [R'] int64)  keep / reorder / duplicate rows of its state
The same functions drive PyTorch, onnxruntime and Triton's decode_loop model; only the step
function differs (see `CachedStep`). Results are token-id lists without BOS/EOS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


class StepFn(Protocol):
    def __call__(self, tokens: np.ndarray) -> np.ndarray: ...

    def select(self, rows: np.ndarray) -> None: ...


@dataclass
class DecodeParams:
    strategy: str = "greedy"  # greedy | beam | sample
    max_new_tokens: int = 30
    beam_size: int = 3
    length_penalty: float = 1.0  # GNMT-style ((5+len)/6)^alpha; 0 = raw log-prob
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class CachedStep:
    """Step function over any backend that maps (input_ids [R,1], cross_kv, past_kv) ->
    (logits [R,1,V] as numpy, present_kv). `index(state, rows)` selects rows of a state
    tensor in that backend's own type (numpy fancy indexing by default)."""

    def __init__(self, run: Callable, cross_kv, past_kv, index: Callable | None = None):
        self.run, self.cross_kv, self.past_kv = run, cross_kv, past_kv
        self.index = index or (lambda a, rows: a[rows])

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        logits, self.past_kv = self.run(tokens.reshape(-1, 1).astype(np.int64), self.cross_kv, self.past_kv)
        return log_softmax(np.asarray(logits)[:, -1, :])

    def select(self, rows: np.ndarray) -> None:
        self.cross_kv = self.index(self.cross_kv, rows)
        self.past_kv = self.index(self.past_kv, rows)


def _banned_ngrams(seq: list[int], n: int) -> list[int]:
    if n <= 0 or len(seq) + 1 < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    banned = []
    for i in range(len(seq) - n + 1):
        if tuple(seq[i:i + n - 1]) == prefix:
            banned.append(seq[i + n - 1])
    return banned


def _decode_rows(step: StepFn, batch_size: int, bos: int, eos: int, max_new_tokens: int, choose) -> list[list[int]]:
    """Shared loop of greedy and sampling: `choose(logp [R,V], active rows, out) -> next [R]`.
    Rows that emit EOS leave the batch (`step.select`), so later steps do less work."""
    out: list[list[int]] = [[] for _ in range(batch_size)]
    active = np.arange(batch_size)
    tokens = np.full(batch_size, bos, dtype=np.int64)
    for _ in range(max_new_tokens):
        nxt = choose(step(tokens), active, out)
        keep = nxt != eos
        for r in np.nonzero(keep)[0]:
            out[active[r]].append(int(nxt[r]))
        if not keep.all():
            if not keep.any():
                break
            rows = np.nonzero(keep)[0]
            step.select(rows)
            active, nxt = active[rows], nxt[rows]
        tokens = nxt
    return out


def greedy(step: StepFn, batch_size: int, bos: int, eos: int, max_new_tokens: int,
           no_repeat_ngram_size: int = 0) -> list[list[int]]:
    def choose(logp, active, out):
        if no_repeat_ngram_size:
            for r, row in enumerate(active):
                logp[r, _banned_ngrams(out[row], no_repeat_ngram_size)] = -np.inf
        return logp.argmax(axis=-1)

    return _decode_rows(step, batch_size, bos, eos, max_new_tokens, choose)


def sample(step: StepFn, batch_size: int, bos: int, eos: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)

    def choose(logp, active, out):
        p = np.exp(log_softmax(logp / max(temperature, 1e-5)))
        if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
            order = np.argsort(-p, axis=-1)
            sp = np.take_along_axis(p, order, axis=-1)
            sp[np.cumsum(sp, axis=-1) - sp >= top_p] = 0.0
            p = np.zeros_like(p)
            np.put_along_axis(p, order, sp, axis=-1)
            p /= p.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(p.shape[1], p=row) for row in p], dtype=np.int64)

    return _decode_rows(step, batch_size, bos, eos, max_new_tokens, choose)


def _lp(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0


def beam_search(step: StepFn, batch_size: int, bos: int, eos: int, max_new_tokens: int,
                beam_size: int = 3, length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0) -> list[list[int]]:
    """Batched beam search. Each image keeps `beam_size` live hypotheses; a hypothesis that
    emits EOS is finished with score logp / lp(len). An image is done once it has
    `beam_size` finished hypotheses (or at max length); the best normalised one wins."""
    K = beam_size
    step.select(np.repeat(np.arange(batch_size), K))  # [B*K] rows, beam-major per image
    seqs: list[list[int]] = [[] for _ in range(batch_size * K)]
    scores = np.zeros((batch_size, K), dtype=np.float64)
    scores[:, 1:] = -np.inf  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch_size)]
    done = np.zeros(batch_size, dtype=bool)
    tokens = np.full(batch_size * K, bos, dtype=np.int64)
    for t in range(max_new_tokens):
        logp = step(tokens).astype(np.float64)  # [B*K, V]
        V = logp.shape[1]
        if no_repeat_ngram_size:
            for r in range(batch_size * K):
                logp[r, _banned_ngrams(seqs[r], no_repeat_ngram_size)] = -np.inf
        cand = (scores.reshape(-1, 1) + logp).reshape(batch_size, K * V)
        top = np.argsort(-cand, axis=1)[:, : 2 * K]
        new_rows = np.zeros(batch_size * K, dtype=np.int64)
        new_tokens = np.full(batch_size * K, eos, dtype=np.int64)
        new_scores = np.full((batch_size, K), -np.inf)
        new_seqs: list[list[int]] = [[] for _ in range(batch_size * K)]
        for b in range(batch_size):
            if done[b]:
                new_rows[b * K:(b + 1) * K] = b * K
                continue
            k = 0
            for c in top[b]:
                s = cand[b, c]
                if not np.isfinite(s):
                    break
                src, tok = b * K + c // V, int(c % V)
                if tok == eos:
                    finished[b].append((s / _lp(len(seqs[src]) + 1, length_penalty), list(seqs[src])))
                    continue
                new_rows[b * K + k], new_tokens[b * K + k] = src, tok
                new_scores[b, k] = s
                new_seqs[b * K + k] = seqs[src] + [tok]
                k += 1
                if k == K:
                    break
            for j in range(k, K):  # fewer live candidates than beams: pad with a dead copy
                new_rows[b * K + j] = new_rows[b * K] if k else b * K
            if len(finished[b]) >= K or k == 0:
                done[b] = True
        if done.all():
            break
        step.select(new_rows)
        seqs, scores, tokens = new_seqs, new_scores, new_tokens
    out = []
    for b in range(batch_size):
        hyps = list(finished[b])
        if not done[b] or not hyps:  # ran out of length: live beams count as finished
            for k in range(K):
                if np.isfinite(scores[b, k]):
                    seq = seqs[b * K + k]
                    hyps.append((scores[b, k] / _lp(len(seq) + 1, length_penalty), seq))
        out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return out


def decode(step: StepFn, batch_size: int, bos: int, eos: int, params: DecodeParams) -> list[list[int]]:
    if params.strategy == "greedy":
        return greedy(step, batch_size, bos, eos, params.max_new_tokens, params.no_repeat_ngram_size)
    if params.strategy == "beam":
        return beam_search(step, batch_size, bos, eos, params.max_new_tokens, params.beam_size,
                           params.length_penalty, params.no_repeat_ngram_size)
    if params.strategy == "sample":
        return sample(step, batch_size, bos, eos, params.max_new_tokens, params.temperature, params.top_p,
                      params.seed)
    raise ValueError(f"unknown decoding strategy {params.strategy!r} (greedy|beam|sample)")
