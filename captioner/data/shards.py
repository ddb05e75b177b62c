"""Training data streamed from tar shards written by `captioner ingest`, from any store,
and the dataset manifest (`manifest.json`) that lists them: `Manifest` is its one typed
owner (save/load; validated field by field when read).

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

Shards and manifests come from a store and are untrusted: a tar member is used only when
its name is exactly `KEY.EXT` (KEY_RE, an allowed extension) and it is listed in the
manifest; extracted files must resolve inside the cache folder.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_bytes
from captioner.data.datasets import collate_grouped
from captioner.data.sources import SPLITS, ImageRecord
from captioner.io.storage import Store, is_s3, iter_tar_members, open_store, split_uri

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "captioner-shards"
FORMAT_VERSION = 1
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")  # what ingest writes (dots would start the extension)
IMAGE_EXTS = ("jpg", "png", "gif", "webp", "bmp")  # the formats preprocess accepts, as ingest names them
SHARD_RE = re.compile(r"(train|val|test)-[0-9]{5,}\.tar")


class ManifestError(ValueError):
    """manifest.json is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class ShardEntry:
    name: str
    split: str
    sha256: str
    size: int
    items: int


@dataclass(frozen=True)
class ItemEntry:
    image_id: str
    key: str
    ext: str
    split: str
    shard: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class SplitCount:
    items: int
    shards: int


@dataclass
class Manifest:
    """The dataset version `captioner ingest` wrote: its shards, items and skipped rows."""
    source: str
    options: dict
    splits: dict  # split -> SplitCount
    shards: list  # [ShardEntry]
    items: list  # [ItemEntry]
    skipped: dict = field(default_factory=dict)  # reason -> [item names]
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def items_in(self, split: str) -> list[ItemEntry]:
        return [it for it in self.items if it.split == split]

    def shards_in(self, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split]

    def to_dict(self) -> dict:
        d = asdict(self)
        for it in d["items"]:
            it["captions"] = list(it["captions"])
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()

    def save(self, store: Store) -> None:
        store.put_bytes(MANIFEST, self.to_json())

    @classmethod
    def load(cls, store: Store) -> "Manifest":
        where = store.url(MANIFEST)
        try:
            raw = json.loads(store.get_bytes(MANIFEST))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(raw, where)

    @classmethod
    def from_dict(cls, d, where: str = MANIFEST) -> "Manifest":
        v = _Validator(where)
        v.obj(d, "")
        if d.get("format") != FORMAT:
            v.fail("format", f"is {d.get('format')!r}, not a captioner shard manifest ({FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            v.fail("version", f"is {d.get('version')!r}; this version of captioner reads version {FORMAT_VERSION}")
        source = v.typed(d, "source", str)
        options = v.typed(d, "options", dict)
        splits = {}
        for name, sc in v.typed(d, "splits", dict).items():
            if name not in SPLITS:
                v.fail(f"splits.{name}", f"unknown split (expected one of {', '.join(SPLITS)})")
            splits[name] = SplitCount(**{f.name: v.typed(sc, f.name, int, f"splits.{name}") for f in fields(SplitCount)})
        shards = []
        for i, s in enumerate(v.typed(d, "shards", list)):
            at = f"shards[{i}]"
            v.obj(s, at)
            e = ShardEntry(**{f.name: v.typed(s, f.name, int if f.name in ("size", "items") else str, at)
                              for f in fields(ShardEntry)})
            if not SHARD_RE.fullmatch(e.name):
                v.fail(f"{at}.name", f"{e.name!r} is not a shard name (SPLIT-NNNNN.tar)")
            if e.split not in SPLITS:
                v.fail(f"{at}.split", f"{e.split!r} is not one of {', '.join(SPLITS)}")
            if not re.fullmatch(r"[0-9a-f]{64}", e.sha256):
                v.fail(f"{at}.sha256", "is not a hex sha256")
            shards.append(e)
        names = {s.name for s in shards}
        items = []
        for i, it in enumerate(v.typed(d, "items", list)):
            at = f"items[{i}]"
            v.obj(it, at)
            caps = v.typed(it, "captions", list, at)
            if not all(isinstance(c, str) for c in caps):
                v.fail(f"{at}.captions", "must be a list of strings")
            e = ItemEntry(**{f.name: v.typed(it, f.name, str, at) for f in fields(ItemEntry) if f.name != "captions"},
                          captions=tuple(caps))
            if not KEY_RE.fullmatch(e.key):
                v.fail(f"{at}.key", f"{e.key!r} is not a shard key (letters, digits, '_' and '-' only)")
            if e.ext not in IMAGE_EXTS:
                v.fail(f"{at}.ext", f"{e.ext!r} is not an accepted image extension ({', '.join(IMAGE_EXTS)})")
            if e.shard not in names:
                v.fail(f"{at}.shard", f"{e.shard!r} is not listed in shards")
            items.append(e)
        skipped = v.typed(d, "skipped", dict) if "skipped" in d else {}
        for k, vals in skipped.items():
            if not isinstance(vals, list):
                v.fail(f"skipped.{k}", "must be a list of item names")
        return cls(source, options, splits, shards, items, skipped)


class _Validator:
    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, why: str):
        raise ManifestError(f"{self.where}: field {path or '(top level)'} {why}")

    def obj(self, x, path: str) -> None:
        if not isinstance(x, dict):
            self.fail(path, f"must be an object, got {type(x).__name__}")

    def typed(self, d: dict, key: str, kind: type, at: str = ""):
        path = f"{at}.{key}" if at else key
        self.obj(d, at)
        if key not in d:
            self.fail(path, "is missing")
        x = d[key]
        if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
            self.fail(path, f"must be {kind.__name__}, got {type(x).__name__} {str(x)[:40]!r}")
        return x


def member_key(name: str) -> tuple[str, str] | None:
    """(key, ext) for a tar member named exactly KEY.EXT with an allowed extension, else None."""
    key, dot, ext = name.partition(".")
    if dot and KEY_RE.fullmatch(key) and ext in (*IMAGE_EXTS, "json"):
        return key, ext
    return None


def is_shard_source(source: str) -> bool:
    if is_s3(source):
        return True
    p = Path(source)
    return (p.is_dir() and (p / MANIFEST).exists()) or p.name == MANIFEST


def shard_store(source: str) -> Store:
    """The store holding a dataset: `source` is its root or the manifest inside it."""
    root, name = split_uri(source)
    return open_store((root or ".") if name == MANIFEST else source)


def open_shard_source(source: str) -> tuple[Store, Manifest]:
    store = shard_store(source)
    return store, Manifest.load(store)


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


def materialize(store: Store, manifest: Manifest, split: str, cache_dir: str | Path,
                max_items: int = 0) -> list[ImageRecord]:
    """Extract a split's images to a local folder (for validation / evaluation). Only members
    named KEY.EXT that the manifest lists are written, each to CACHE/KEY.EXT inside the cache."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    root = cache.resolve()
    listed = manifest.items_in(split)
    want = listed[:max_items] if max_items else listed
    listed_keys = {it.key for it in listed}  # members beyond max_items are skipped without a warning
    by_shard: dict[str, dict[str, ItemEntry]] = {}
    for it in want:
        by_shard.setdefault(it.shard, {})[it.key] = it
    recs = []
    for shard, items in by_shard.items():
        with store.open(shard) as f:
            for m, data in iter_tar_members(f):
                ke = member_key(m.name)
                it = items.get(ke[0]) if ke else None
                if it is None or ke[1] != it.ext:
                    if not (ke and (ke[1] == "json" or (it is None and ke[0] in listed_keys))):
                        log.warning("%s: ignoring tar member %r (not KEY.EXT of a listed item)", shard, m.name)
                    continue
                p = (root / f"{it.key}.{it.ext}").resolve()
                if p.parent != root:  # e.g. a symlink planted in the cache
                    log.warning("%s: refusing to write %s outside %s", shard, p, root)
                    continue
                if not p.exists():
                    p.write_bytes(data)
                recs.append(ImageRecord(it.image_id, str(p), list(it.captions), split))
    order = {it.key: i for i, it in enumerate(want)}
    recs.sort(key=lambda r: order.get(Path(r.path).stem, 0))
    (cache / "records.json").write_text(json.dumps([r.__dict__ for r in recs]))
    return recs
