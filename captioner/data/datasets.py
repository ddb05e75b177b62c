"""The torch side of raw-format data: the per-image Dataset, the grouped collate (images once,
captions flattened) and the resumable DDP batch sampler that training uses with records read
by `captioner.data.sources`."""
from __future__ import annotations

import logging
import math
from typing import Iterator

import torch

from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_path
from captioner.data.sources import ImageRecord

log = logging.getLogger(__name__)


class CaptionImageDataset(torch.utils.data.Dataset):
    """One item per *image*: (pixels [3,H,W], [token ids of each caption], image_id).
    A bad image yields None (logged with its name); `collate_grouped` drops it."""

    def __init__(self, recs: list[ImageRecord], tokenizer, pre: PreprocessConfig, max_len: int):
        self.recs, self.pre, self.max_len = recs, pre, max_len
        self.tokens = [[tokenizer.encode(c, max_len) for c in r.captions] for r in recs]

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        r = self.recs[i]
        try:
            x = preprocess_path(r.path, self.pre, name=r.image_id)
        except ImageError as e:
            log.warning("skipping image at load time: %s", e)
            return None
        return torch.from_numpy(x), self.tokens[i], r.image_id


def collate_grouped(batch, pad_id: int = 0):
    """Images once, captions flattened: images [B,3,H,W], tokens [N,T] (padded),
    image_index [N] (row -> image), ids [B]."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    images = torch.stack([b[0] for b in batch])
    rows, index = [], []
    for i, (_, toks, _) in enumerate(batch):
        rows += toks
        index += [i] * len(toks)
    T = max(len(t) for t in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for j, t in enumerate(rows):
        tokens[j, : len(t)] = torch.tensor(t)
    return images, tokens, torch.tensor(index), [b[2] for b in batch]


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Deterministic per-epoch shuffle, sharded across DDP ranks (each rank gets the same
    number of batches), that can start mid-epoch so `--resume` replays the exact order.

    Rank r takes positions r, r + W, r + 2W... of the epoch's permutation, so after every rank
    has taken k batches the items consumed are exactly the first k x batch x W positions: the
    epoch position is one number in sample space. `start_item` skips that many positions and
    deals the rest to the ranks of this run, whatever its world size (an elastic resume).
    When the items left do not divide by W, the list wraps to its own head, as
    torch.utils.data.DistributedSampler does: up to W-1 images are seen twice per epoch."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.bs, self.rank, self.world, self.seed, self.shuffle = n, batch_size, rank, world, seed, shuffle
        self.epoch, self.start, self.start_item = 0, 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, start_item: int = 0) -> None:
        self.epoch, self.start, self.start_item = epoch, start_batch, min(max(0, start_item), self.n)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        idx = idx[self.start_item:]
        pad = self._per_rank() * self.world - len(idx)
        idx += [idx[i % len(idx)] for i in range(pad)] if idx else []  # every rank gets the same count
        return idx[self.rank::self.world]

    def _per_rank(self) -> int:
        return math.ceil((self.n - self.start_item) / self.world)

    def __len__(self) -> int:
        return math.ceil(self._per_rank() / self.bs)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for b in range(self.start, len(self)):
            yield idx[b * self.bs:(b + 1) * self.bs]
