"""The dataset manifest (`manifest.json`) that `captioner ingest` writes last, and torch-free
access to the shards it lists: `Manifest` is the format's one typed owner (save/load;
validated field by field when read), `open_shard_source` opens a dataset from any store, and
`materialize` extracts a split's images to a local folder. The torch stream over the same
shards is `captioner.data.shards.ShardStream`.

Shards and manifests come from a store and are untrusted: a tar member is used only when
its name is exactly `KEY.EXT` (KEY_RE, an allowed extension) and it is listed in the
manifest; extracted files must resolve inside the cache folder.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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
