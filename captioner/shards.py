"""Training data streamed from tar shards written by `captioner ingest`, from any store.

Per epoch the shard order is shuffled (seeded), the split's items are laid out in that
order, and each DDP rank takes one contiguous share, each DataLoader worker one contiguous
part of it: every item is read by exactly one (rank, worker), and a worker opens only the
shards its part touches. Items are shuffled again within a buffer. Ranks may hold one item
more or less; every rank runs the same number of batches (`batches_per_rank`), the short
ones padding with empty batches, so DDP stays in step without repeating items.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch

from captioner.data import ImageRecord, collate_grouped
from captioner.ingest import MANIFEST, load_manifest
from captioner.preprocess import ImageError, PreprocessConfig, preprocess_bytes
from captioner.storage import Store, is_s3, iter_tar_members, open_store, split_uri

log = logging.getLogger(__name__)


def is_shard_source(source: str) -> bool:
    if is_s3(source):
        return True
    p = Path(source)
    return (p.is_dir() and (p / MANIFEST).exists()) or p.name == MANIFEST


def shard_store(source: str) -> Store:
    """The store holding a dataset: `source` is its root or the manifest inside it."""
    root, name = split_uri(source)
    return open_store((root or ".") if name == MANIFEST else source)


def open_shard_source(source: str) -> tuple[Store, dict]:
    store = shard_store(source)
    return store, load_manifest(store)


def _chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    return (n * i) // parts, (n * (i + 1)) // parts


class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, store: Store, manifest: dict, split: str, tokenizer, pre: PreprocessConfig, max_len: int,
                 batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 num_workers: int = 0, shuffle: bool = True):
        self.store, self.split, self.pre, self.max_len = store, split, pre, max_len
        self.bs, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.buffer, self.num_workers, self.shuffle = max(1, shuffle_buffer), max(0, num_workers), shuffle
        self.shards = [s for s in manifest["shards"] if s["split"] == split]
        self.items_by_shard: dict[str, list] = {}
        for it in manifest["items"]:
            if it["split"] == split:
                self.items_by_shard.setdefault(it["shard"], []).append(it)
        self.tokens = {it["key"]: [tokenizer.encode(c, max_len) for c in it["captions"]]
                       for items in self.items_by_shard.values() for it in items}
        self.n = sum(len(v) for v in self.items_by_shard.values())
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[dict]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1000003 + self.epoch).shuffle(shards)
        return shards

    def _my_range(self, rank: int, worker: int, nw: int) -> tuple[int, int]:
        a, b = _chunk(self.n, self.world, rank)
        wa, wb = _chunk(b - a, nw, worker)
        return a + wa, a + wb

    def batches_per_rank(self) -> int:
        nw = max(1, self.num_workers)
        return max(sum(math.ceil((lambda r: r[1] - r[0])(self._my_range(r, w, nw)) / self.bs) for w in range(nw))
                   for r in range(self.world))

    def plan(self, rank: int | None = None, worker: int = 0) -> list[str]:
        """Keys this (rank, worker) reads this epoch, in shard order (before buffer shuffle)."""
        lo, hi = self._my_range(self.rank if rank is None else rank, worker, max(1, self.num_workers))
        keys, pos = [], 0
        for s in self._order():
            items = self.items_by_shard.get(s["name"], [])
            for it in items:
                if lo <= pos < hi:
                    keys.append(it["key"])
                pos += 1
        return keys

    def _stream(self, wid: int):
        lo, hi = self._my_range(self.rank, wid, max(1, self.num_workers))
        pos = 0
        for s in self._order():
            items = self.items_by_shard.get(s["name"], [])
            start, end = pos, pos + len(items)
            pos = end
            if end <= lo or start >= hi:
                continue  # this worker needs nothing from this shard
            wanted = {it["key"]: it for k, it in enumerate(items) if lo <= start + k < hi}
            pending: dict[str, dict] = {}
            with self.store.open(s["name"]) as f:
                for m, data in iter_tar_members(f):
                    key, _, ext = m.name.partition(".")
                    if key not in wanted:
                        continue
                    pending.setdefault(key, {})[ext] = data
                    it = wanted[key]
                    if it["ext"] in pending[key] and "json" in pending[key]:
                        yield it, pending.pop(key)[it["ext"]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        if info is None and self.num_workers > 0:
            raise RuntimeError("ShardStream was built for DataLoader workers but runs without them")
        rng = random.Random(hash((self.seed, self.epoch, self.rank, wid)) & 0xFFFFFFFF)
        buf: list = []
        batch: list = []

        def emit(it, data):
            try:
                x = preprocess_bytes(data, self.pre, name=it["image_id"])
                return torch.from_numpy(x), self.tokens[it["key"]], it["image_id"]
            except ImageError as e:
                log.warning("skipping image from shard: %s", e)
                return None

        for it, data in self._stream(wid):
            buf.append((it, data))
            if len(buf) >= self.buffer:
                j = rng.randrange(len(buf)) if self.shuffle else 0
                batch.append(emit(*buf.pop(j)))
                if len(batch) == self.bs:
                    yield collate_grouped(batch)
                    batch = []
        if self.shuffle:
            rng.shuffle(buf)
        for item in buf:
            batch.append(emit(*item))
            if len(batch) == self.bs:
                yield collate_grouped(batch)
                batch = []
        if batch:
            yield collate_grouped(batch)


def materialize(store: Store, manifest: dict, split: str, cache_dir: str | Path, max_items: int = 0) -> list[ImageRecord]:
    """Extract a split's images to a local folder (for validation / evaluation)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    want = [it for it in manifest["items"] if it["split"] == split]
    if max_items:
        want = want[:max_items]
    by_shard: dict[str, dict] = {}
    for it in want:
        by_shard.setdefault(it["shard"], {})[it["key"]] = it
    recs = []
    for shard, items in by_shard.items():
        with store.open(shard) as f:
            for m, data in iter_tar_members(f):
                key, _, ext = m.name.partition(".")
                it = items.get(key)
                if it and ext == it["ext"]:
                    p = cache / f"{key}.{ext}"
                    if not p.exists():
                        p.write_bytes(data)
                    recs.append(ImageRecord(it["image_id"], str(p), list(it["captions"]), split))
    order = {it["key"]: i for i, it in enumerate(want)}
    recs.sort(key=lambda r: order.get(Path(r.path).stem, 0))
    (cache / "records.json").write_text(json.dumps([r.__dict__ for r in recs]))
    return recs
