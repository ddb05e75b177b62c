"""Training data streamed from tar shards written by `captioner ingest`, from any store, as
the dataset manifest (`captioner.data.manifest.Manifest`) lists them.

Per epoch the shard order is shuffled (seeded) and the split's items are laid out in that
order. Every item is read by exactly one reader (DDP rank x DataLoader worker): with at least
one shard per reader each reader gets whole shards, so every shard is read once per epoch;
with fewer, each reader gets one contiguous part of the item sequence and reads only up to
its last item (a warning names the shard size to re-ingest with). Items are shuffled again
within a buffer; the resulting batches are a function of keys alone (`batch_plan`), which is
what lets a resume with another world size or worker count continue the epoch with exactly
the items not yet consumed. Readers may hold different item counts: every rank runs the
same number of micro-batches (`batches_per_rank`) and the short ones run padding steps
(train.py `_micro_step`: zero-weighted, through the DDP module, so every collective matches).

Shards come from a store and are untrusted: a tar member is used only when its name is
exactly `KEY.EXT` (`manifest.member_key`) and it is listed in the manifest.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_bytes
from captioner.data.datasets import collate_grouped
from captioner.data.manifest import ItemEntry, Manifest, ShardEntry, member_key
from captioner.io.storage import Store, iter_tar_members

log = logging.getLogger(__name__)


def _chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    return (n * i) // parts, (n * (i + 1)) // parts


def _shard_bounds(counts: list[int], parts: int) -> list[int]:
    """Cut a sequence of shards (item counts `counts`) into `parts` contiguous non-empty runs
    whose item totals are as even as the shard boundaries allow: boundary i is the shard
    boundary nearest to i/parts of the items. Needs len(counts) >= parts."""
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    n, S, bounds = cum[-1], len(counts), [0]
    for i in range(1, parts):
        lo, hi = bounds[-1] + 1, S - (parts - i)  # leave at least one shard for each later part
        target = n * i / parts
        bounds.append(min(range(lo, hi + 1), key=lambda b: (abs(cum[b] - target), b)))
    return bounds + [S]


def buffer_shuffle(seq, rng: random.Random, size: int, shuffle: bool = True):
    """The streaming shuffle: hold up to `size` items, emit a random one per item read, then
    the rest in random order. The order depends only on the input order and `rng`, so it can
    be computed from keys alone (the loader's plan) and replayed on the data (the stream)."""
    buf: list = []
    for x in seq:
        buf.append(x)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)) if shuffle else 0)
    if shuffle:
        rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class Layout:
    """What decides who reads which item in an epoch: a resume with the same layout replays
    the same batches; with another one the rest of the epoch is planned again from the
    items not yet consumed (`ShardStream.consumed`)."""
    world: int
    num_workers: int
    batch_size: int
    seed: int
    shuffle_buffer: int
    partition: str = "auto"

    @property
    def readers(self) -> int:
        return self.world * max(1, self.num_workers)


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's share of a split's shards, as micro-batches (see the module docstring).

    Partition (`partition`): with at least one shard per reader (ranks x DataLoader workers),
    "auto" gives each reader whole shards (contiguous runs in the epoch's shard order, cut at
    the shard boundary nearest an even item split), so every shard is read once per epoch.
    With fewer shards it cuts the epoch's item sequence into even contiguous parts (as
    "items" always does): a shard may then be read by several readers, each stopping after
    its last item (`iter_tar_members(stop=...)`) and, on a seekable store, seeking over the
    members it does not need; `read_amplification` says how much that costs.

    `skip` (keys) leaves items out of this epoch: an elastic resume continues an epoch with
    the items the checkpoint's layout had not consumed yet. `tagged` makes the stream yield
    (worker, batch index, batch) so the trainer can record exactly what it consumed; a batch
    whose images all failed to decode is then (worker, index, None), never dropped."""

    def __init__(self, store: Store, manifest: Manifest, split: str, tokenizer, pre: PreprocessConfig, max_len: int,
                 batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 num_workers: int = 0, shuffle: bool = True, partition: str = "auto", tagged: bool = False):
        if partition not in ("auto", "items"):
            raise ValueError(f"partition {partition!r} is not one of auto, items")
        self.store, self.split, self.pre, self.max_len = store, split, pre, max_len
        self.bs, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.buffer, self.num_workers, self.shuffle = max(1, shuffle_buffer), max(0, num_workers), shuffle
        self.partition, self.tagged = partition, tagged
        self.shards = manifest.shards_in(split)
        self.items_by_shard: dict[str, list[ItemEntry]] = {}
        for it in manifest.items_in(split):
            self.items_by_shard.setdefault(it.shard, []).append(it)
        self.tokens = {it.key: [tokenizer.encode(c, max_len) for c in it.captions]
                       for items in self.items_by_shard.values() for it in items} if tokenizer is not None else {}
        self.n = sum(len(v) for v in self.items_by_shard.values())
        self.epoch = 0
        self.skip: frozenset = frozenset()

    @property
    def layout(self) -> Layout:
        return Layout(self.world, self.num_workers, self.bs, self.seed, self.buffer, self.partition)

    def set_epoch(self, epoch: int, skip=()) -> None:
        self.epoch, self.skip = epoch, frozenset(skip)

    def _order(self) -> list[ShardEntry]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1000003 + self.epoch).shuffle(shards)
        return shards

    def _epoch_shards(self) -> list[tuple[ShardEntry, list[ItemEntry]]]:
        """This epoch's shards in read order with the items still to train on (skip removed)."""
        key = (self.epoch, self.seed, self.skip)
        if getattr(self, "_cache", (None,))[0] != key:
            self._cache = (key, self._layout_epoch())
        return self._cache[1]

    def _layout_epoch(self) -> list[tuple[ShardEntry, list[ItemEntry]]]:
        out = []
        for s in self._order():
            items = [it for it in self.items_by_shard.get(s.name, []) if it.key not in self.skip]
            if items:
                out.append((s, items))
        return out

    def by_shard(self) -> bool:
        """True when readers get whole shards this epoch (enough shards for every reader)."""
        return self.partition == "auto" and len(self._epoch_shards()) >= self.layout.readers

    def _reads(self, rank: int, worker: int) -> list[tuple[ShardEntry, list[ItemEntry]]]:
        """What reader (rank, worker) reads this epoch: [(shard, its items for this reader)]."""
        shards, nw = self._epoch_shards(), max(1, self.num_workers)
        slot, readers = rank * nw + worker, self.world * nw
        if self.by_shard():
            b = _shard_bounds([len(items) for _, items in shards], readers)
            return shards[b[slot]:b[slot + 1]]
        n = sum(len(items) for _, items in shards)
        ra, rb = _chunk(n, self.world, rank)  # the rank's share, then the worker's part of it
        wa, wb = _chunk(rb - ra, nw, worker)
        lo, hi, pos, out = ra + wa, ra + wb, 0, []
        for s, items in shards:
            mine = [it for k, it in enumerate(items) if lo <= pos + k < hi]
            pos += len(items)
            if mine:
                out.append((s, mine))
        return out

    def _rng(self, rank: int, worker: int) -> random.Random:
        return random.Random(hash((self.seed, self.epoch, rank, worker)) & 0xFFFFFFFF)

    def plan(self, rank: int | None = None, worker: int = 0) -> list[str]:
        """Keys this (rank, worker) reads this epoch, in shard order (before buffer shuffle)."""
        return [it.key for _, items in self._reads(self.rank if rank is None else rank, worker) for it in items]

    def batch_plan(self, rank: int | None = None, worker: int = 0) -> list[list[str]]:
        """The keys of each micro-batch reader (rank, worker) yields this epoch, in order."""
        rank = self.rank if rank is None else rank
        order = list(buffer_shuffle(self.plan(rank, worker), self._rng(rank, worker), self.buffer, self.shuffle))
        return [order[i:i + self.bs] for i in range(0, len(order), self.bs)]

    def batches_of(self, rank: int) -> int:
        return sum(math.ceil(len(self.plan(rank, w)) / self.bs) for w in range(max(1, self.num_workers)))

    def batches_per_rank(self) -> int:
        """Micro-batches every rank runs this epoch: the most any rank has (the others pad)."""
        return max(self.batches_of(r) for r in range(self.world))

    def consumed(self, per_worker: list[list[int]]) -> set[str]:
        """Keys consumed when rank r has taken per_worker[r][w] batches from its worker w."""
        return {k for r, counts in enumerate(per_worker) for w, c in enumerate(counts)
                for b in self.batch_plan(r, w)[:c] for k in b}

    def read_amplification(self) -> tuple[int, int]:
        """(shard reads, shards) this epoch: each reader reads every shard it touches."""
        nw = max(1, self.num_workers)
        reads = sum(len(self._reads(r, w)) for r in range(self.world) for w in range(nw))
        return reads, len(self._epoch_shards())

    def repack_hint(self, data_bytes: int) -> str:
        readers = self.layout.readers
        mb = data_bytes / 1e6 / (2 * readers)
        nw = max(1, self.num_workers)
        return (f"{len(self._epoch_shards())} {self.split} shard(s) for {self.world} rank(s) x {nw} "
                f"loader worker(s) = {readers} readers: shards are split between readers and read several times per "
                f"epoch; re-ingest with --shard-mb {max(mb, 0.01):.2f} (or --shard-mb auto --target-workers {readers}) "
                "to give every reader whole shards")

    def _stream(self, wid: int):
        """(item, image bytes or None) for this reader, in plan order: a shard's items are
        yielded in manifest order once its wanted members are in, so the stream follows
        `batch_plan` exactly even when a member is missing (then the bytes are None)."""
        for s, items in self._reads(self.rank, wid):
            wanted = {it.key: it for it in items}
            got: dict[str, dict] = {}
            left = len(wanted)
            with self.store.open(s.name) as f:
                for m, data in iter_tar_members(f, want=lambda name: (member_key(name) or ("",))[0] in wanted):
                    key, ext = member_key(m.name)
                    parts = got.setdefault(key, {})
                    parts[ext] = data
                    if wanted[key].ext in parts and "json" in parts and len(parts) == 2:
                        left -= 1
                        if left == 0:
                            break  # the rest of the shard belongs to other readers: stop reading it
            for it in items:
                data = got.get(it.key, {}).get(it.ext)
                if data is None or "json" not in got.get(it.key, {}):
                    log.warning("%s: item %s (%s.%s) is missing from the shard", s.name, it.image_id, it.key, it.ext)
                    data = None
                yield it, data

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        if info is None and self.num_workers > 0:
            raise RuntimeError("ShardStream was built for DataLoader workers but runs without them")

        def emit(it, data):
            if data is None:
                return None
            try:
                x = preprocess_bytes(data, self.pre, name=it.image_id)
                return torch.from_numpy(x), self.tokens[it.key], it.image_id
            except ImageError as e:
                log.warning("skipping image from shard: %s", e)
                return None

        batch: list = []
        j = 0
        for item in buffer_shuffle(self._stream(wid), self._rng(self.rank, wid), self.buffer, self.shuffle):
            batch.append(emit(*item))
            if len(batch) == self.bs:
                yield (wid, j, collate_grouped(batch)) if self.tagged else collate_grouped(batch)
                batch, j = [], j + 1
        if batch:
            yield (wid, j, collate_grouped(batch)) if self.tagged else collate_grouped(batch)
