"""`captioner ingest SOURCE DEST` and `captioner verify DEST`.

Validates every image (decoded, pixel count bounded) and caption, strips image metadata
(EXIF/GPS, XMP, comments; orientation baked in) unless told not to, optionally resizes, packs
images + captions into WebDataset-style tar shards grouped by split, uploads them in
parallel and writes `manifest.json` (a `manifest.Manifest`) last. A zip source is extracted
member by member under a byte and member cap, never outside its folder. Shard bytes are deterministic (sorted items,
fixed tar headers), so a rerun after an interruption skips every shard already stored with
the right sha256 and ends with exactly the store a clean run writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import tarfile
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from captioner.core.preprocess import DEFAULT_MAX_PIXELS, FORMAT_EXT, ImageError, load_image, open_image
from captioner.data.manifest import MANIFEST, ItemEntry, Manifest, ShardEntry, SplitCount
from captioner.data.sources import SPLITS, DataSummary, ImageRecord, assign_splits, read_records
from captioner.io.storage import Store, confined, open_store, sha256_file

log = logging.getLogger(__name__)
# A zip source is extracted only while it stays under these (Flickr30k: ~32k members, 4.4 GB;
# COCO 2014 train+val: ~124k members, 19 GB); a zip bomb stops at the cap, not at a full disk.
MAX_UNZIP_BYTES = 100 * 1024**3
MAX_UNZIP_MEMBERS = 1_000_000


@dataclass
class IngestOptions:
    shard_mb: float | str = 64.0  # target shard size; a shard closes once it passes this; "auto": see target_workers
    # with shard_mb "auto": readers of the training cluster (ranks x DataLoader workers per rank); shards then
    # close after a number of items chosen so every reader gets whole shards (`auto_shard_items`)
    target_workers: int = 0
    shard_items: int = 0  # close a shard after this many items too (0 = no limit; set by "auto")
    max_side: int = 0  # resize so the longer side is at most this (0 = keep original bytes)
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 8  # parallel uploads (and image checks)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    format: str = "auto"
    image_root: str = ""
    strip_metadata: bool = True  # drop EXIF (GPS, camera serials), XMP and comments from stored images
    progress: bool = True


def _key(image_id: str, used: set) -> str:
    """WebDataset keys may not contain dots (the first dot starts the extension)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(image_id).stem) or "item"
    k, n = base, 1
    while k in used:
        n += 1
        k = f"{base}_{n}"
    used.add(k)
    return k


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


_METADATA = ("exif", "xmp", "XML:com.adobe.xmp", "comment")


def _has_metadata(img: Image.Image) -> bool:
    try:
        return bool(img.getexif()) or any(k in img.info for k in _METADATA)
    except Exception:  # noqa: BLE001 - unreadable EXIF still counts as metadata to drop
        return True


def _image_bytes(r: ImageRecord, o: IngestOptions) -> tuple[bytes, str]:
    """Validated image bytes and extension; raises ImageError naming the image. Re-encoded
    (upright pixels, no metadata) when resized or when stripping metadata it carries; else
    the original bytes."""
    img = load_image(r.path, o.max_pixels, name=r.image_id)  # full decode: catches truncation/bombs
    data = Path(r.path).read_bytes()
    src = open_image(data, o.max_pixels, name=r.image_id)
    fmt = src.format or "JPEG"
    resize = bool(o.max_side and max(img.size) > o.max_side)
    if not resize and not (o.strip_metadata and _has_metadata(src)):
        return data, FORMAT_EXT[fmt]
    if resize:
        img.thumbnail((o.max_side, o.max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if resize or FORMAT_EXT[fmt] == "jpg":  # load_image made it upright RGB, so no orientation tag is needed
        img.save(buf, "JPEG", quality=90 if resize else 95, icc_profile=src.info.get("icc_profile"))
        return buf.getvalue(), "jpg"
    img.save(buf, "PNG")
    return buf.getvalue(), "png"


@dataclass
class Shard:
    name: str
    split: str
    path: Path
    items: list = field(default_factory=list)
    size: int = 0
    sha256: str = ""


def extract_zip(path: Path, dest: Path) -> None:
    """Extract regular files inside `dest`, refusing the archive past MAX_UNZIP_MEMBERS members
    or MAX_UNZIP_BYTES bytes actually written (headers may lie: bytes are counted as they
    are inflated). Names that are absolute or climb out ('../') are skipped with a warning."""
    cap, total = MAX_UNZIP_BYTES, 0
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) > MAX_UNZIP_MEMBERS:
            raise ValueError(f"{path}: zip holds {len(infos)} members, over the limit of {MAX_UNZIP_MEMBERS}")
        for info in infos:
            name = info.filename.replace("\\", "/")
            if info.is_dir():
                continue
            dst = confined(dest, name)
            if dst is None or ":" in name.split("/")[0]:
                log.warning("%s: skipping member %r (absolute or outside the archive)", path, info.filename)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dst, "wb") as out:
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if total > cap:
                        out.close()
                        dst.unlink()
                        raise ValueError(f"{path}: zip expands to more than {cap / 1e6:.1f} MB (the limit); "
                                         f"stopped at member {info.filename!r}")
                    out.write(chunk)


def _source_dir(source: str, tmp: Path) -> Path:
    p = Path(source)
    if p.suffix == ".zip":
        log.info("extracting %s", p)
        try:
            extract_zip(p, tmp / "src")
        except zipfile.BadZipFile as e:
            raise ValueError(f"{source}: not a readable zip ({e})") from None
        root = tmp / "src"
        hits = (sorted(root.rglob("results.csv")) or sorted(root.rglob("metadata.jsonl"))
                or sorted(root.rglob("*.json")) or sorted(root.rglob("*.csv")))
        if not hits:
            raise ValueError(f"{source}: zip holds no results.csv, metadata.jsonl, captions JSON or CSV")
        return hits[0].parent if hits[0].name in ("results.csv", "metadata.jsonl") else hits[0]
    return p


AUTO_MAX_MB = 64.0  # "auto" never makes shards larger than the default size
AUTO_SHARDS_PER_READER = 2  # at least two shards per reader: the contiguous split stays even


def auto_shard_items(n_train: int, readers: int) -> int:
    """Items per shard so the training split makes at least AUTO_SHARDS_PER_READER shards
    per reader (train.py gives each reader whole shards when there is at least one each,
    so every shard is read once per epoch). Fewer items than readers cannot do that: then
    one item per shard, and the trainer warns."""
    return max(1, n_train // (AUTO_SHARDS_PER_READER * max(1, readers)))


def _check_auto(o: IngestOptions) -> None:
    if o.shard_mb == "auto" and o.target_workers < 1:
        raise ValueError("--shard-mb auto needs --target-workers N: the readers of the cluster that trains on this "
                         "data (ranks x DataLoader workers per rank, e.g. 8 GPUs x 4 workers = 32)")


def _resolve_shard_size(records: list[ImageRecord], o: IngestOptions) -> IngestOptions:
    """The options with "auto" turned into an item count per shard (and the 64 MB cap)."""
    if o.shard_mb != "auto":
        return o
    _check_auto(o)
    n_train = sum(1 for r in records if r.split == "train")
    o = dataclasses.replace(o, shard_items=auto_shard_items(n_train, o.target_workers), shard_mb=AUTO_MAX_MB)
    if n_train < o.target_workers:
        log.warning("%d training images for %d readers: some readers will have no shard of their own", n_train,
                    o.target_workers)
    log.info("--shard-mb auto: %d items per shard (at most %.0f MB) for %d readers: about %d training shards",
             o.shard_items, AUTO_MAX_MB, o.target_workers, -(-n_train // o.shard_items))
    return o


def build_shards(records: list[ImageRecord], summary: DataSummary, o: IngestOptions, stage: Path) -> list[Shard]:
    """Validate and pack items into shards under `stage` (deterministic bytes)."""
    order = {s: i for i, s in enumerate(SPLITS)}
    records = sorted(records, key=lambda r: (order.get(r.split, 9), r.image_id))
    with ThreadPoolExecutor(max(1, o.workers)) as ex:  # decode/validate in parallel, pack in order
        futs = [ex.submit(_image_bytes, r, o) for r in records]
        shards: list[Shard] = []
        cur: Shard | None = None
        tf = None
        used: set = set()
        counts: dict = {}
        bar = tqdm(total=len(records), desc="pack", unit="img", disable=not o.progress)
        for r, f in zip(records, futs):
            bar.update(1)
            try:
                data, ext = f.result()
            except ImageError as e:
                summary.skip("unreadable image", r.image_id, str(e))
                continue
            caps = [c.strip() for c in r.captions if c and c.strip()]
            if not caps:
                summary.skip("image without captions", r.image_id)
                continue
            if cur is None or cur.split != r.split or cur.size >= float(o.shard_mb) * 1e6 or \
                    (o.shard_items and len(cur.items) >= o.shard_items):
                if tf:
                    tf.close()
                n = counts.get(r.split, 0)
                counts[r.split] = n + 1
                cur = Shard(f"{r.split}-{n:05d}.tar", r.split, stage / f"{r.split}-{n:05d}.tar")
                shards.append(cur)
                tf = tarfile.open(cur.path, "w", format=tarfile.USTAR_FORMAT)
            k = _key(r.image_id, used)
            meta = json.dumps({"image_id": r.image_id, "split": r.split, "captions": caps}, sort_keys=True).encode()
            tf.addfile(_tarinfo(f"{k}.{ext}", len(data)), io.BytesIO(data))
            tf.addfile(_tarinfo(f"{k}.json", len(meta)), io.BytesIO(meta))
            cur.items.append(ItemEntry(r.image_id, k, ext, r.split, cur.name, tuple(caps)))
            cur.size += len(data) + len(meta) + 1024
        if tf:
            tf.close()
        bar.close()
    for s in shards:
        s.size = s.path.stat().st_size
        s.sha256 = sha256_file(s.path)
    return shards


def manifest_for(shards: list[Shard], summary: DataSummary, source: str, o: IngestOptions) -> Manifest:
    return Manifest(
        source=str(source),
        options={"max_side": o.max_side, "max_pixels": o.max_pixels, "val_fraction": o.val_fraction,
                 "test_fraction": o.test_fraction, "split_seed": o.split_seed, "strip_metadata": o.strip_metadata,
                 **({"shard_items": o.shard_items, "target_workers": o.target_workers} if o.shard_items else {})},
        splits={s: SplitCount(sum(len(x.items) for x in shards if x.split == s), sum(1 for x in shards if x.split == s))
                for s in SPLITS},
        shards=[ShardEntry(s.name, s.split, s.sha256, s.size, len(s.items)) for s in shards],
        items=[it for s in shards for it in s.items],
        skipped={k: sorted(v) for k, v in summary.skipped.items()},
    )


def upload_shards(store: Store, shards: list[Shard], workers: int, progress: bool = True) -> dict:
    """Upload missing shards in parallel; skip ones already stored with the right sha256."""
    stats = {"uploaded": 0, "skipped": 0, "bytes": 0}
    lock = threading.Lock()
    bar = tqdm(total=sum(s.size for s in shards), desc="upload", unit="B", unit_scale=True, disable=not progress)

    def one(s: Shard):
        if store.stored_sha256(s.name) == s.sha256:
            with lock:
                stats["skipped"] += 1
                bar.update(s.size)
            log.info("shard %s already stored with sha256 %s: skipped", s.name, s.sha256[:12])
            return
        store.put_file(s.name, s.path, sha256=s.sha256)
        with lock:
            stats["uploaded"] += 1
            stats["bytes"] += s.size
            bar.update(s.size)
        log.info("uploaded shard %s (%d items, %.2f MB)", s.name, len(s.items), s.size / 1e6)

    with ThreadPoolExecutor(max(1, workers)) as ex:
        for f in as_completed([ex.submit(one, s) for s in shards]):
            f.result()
    bar.close()
    return stats


def ingest(source: str, dest: str, o: IngestOptions | None = None, store: Store | None = None) -> dict:
    o = o or IngestOptions()
    _check_auto(o)  # before any work
    t0 = time.time()
    store = store or open_store(dest, create=True)
    stale = store.cleanup_partials()
    if stale:
        log.info("removed %d partial file(s) left by an interrupted run", stale)
    with tempfile.TemporaryDirectory(prefix="captioner-ingest-") as tmp:
        src = _source_dir(source, Path(tmp))
        records, summary = read_records(src, o.format, o.image_root)
        assign_splits(records, o.val_fraction, o.test_fraction, o.split_seed)
        o = _resolve_shard_size(records, o)
        stage = Path(tmp) / "shards"
        stage.mkdir()
        shards = build_shards(records, summary, o, stage)
        if not shards:
            raise ValueError(f"nothing to ingest from {source}: {summary.text()}")
        manifest = manifest_for(shards, summary, source, o)
        stats = upload_shards(store, shards, o.workers, o.progress)
        body = manifest.to_json()
        if store.exists(MANIFEST) and store.get_bytes(MANIFEST) != body:
            log.warning("%s changes: the source or options differ from the stored dataset version", store.url(MANIFEST))
        manifest.save(store)  # last: its presence marks a complete dataset version
    dt = time.time() - t0
    total_bytes = sum(s.size for s in shards)
    report = {"dest": store.uri, "manifest": store.url(MANIFEST), "manifest_sha256": hashlib.sha256(body).hexdigest(),
              "items": len(manifest.items), "shards": len(shards), "bytes": total_bytes, **stats,
              "skipped_items": {k: len(v) for k, v in summary.skipped.items()}, "seconds": round(dt, 2),
              "items_per_s": round(len(manifest.items) / dt, 1), "mb_per_s": round(total_bytes / 1e6 / dt, 2)}
    log.info("ingest done: %d items in %d shards (%.1f MB) -> %s; uploaded %d, already present %d; skipped items: %s; "
             "%.1fs (%.0f items/s, %.1f MB/s)", report["items"], report["shards"], total_bytes / 1e6, store.uri,
             stats["uploaded"], stats["skipped"], report["skipped_items"] or "none", dt, report["items_per_s"],
             report["mb_per_s"])
    return report


def verify(dest: str, store: Store | None = None, workers: int = 8, progress: bool = True) -> dict:
    """Re-check every shard of the manifest against the store: present, right size, right sha256."""
    store = store or open_store(dest)
    manifest = Manifest.load(store)
    problems = []

    def one(s: ShardEntry):
        size = store.size(s.name)
        if size is None:
            return f"{s.name}: missing"
        if size != s.size:
            return f"{s.name}: size {size} != manifest {s.size}"
        got = store.sha256(s.name)
        return None if got == s.sha256 else f"{s.name}: sha256 {got[:12]} != manifest {s.sha256[:12]}"

    with ThreadPoolExecutor(max(1, workers)) as ex:
        for r in tqdm(ex.map(one, manifest.shards), total=len(manifest.shards), desc="verify", unit="shard",
                      disable=not progress):
            if r:
                problems.append(r)
    names = {s.name for s in manifest.shards}
    extra = [k for k in store.list() if k.endswith(".tar") and k not in names]
    return {"dest": store.uri, "shards": len(manifest.shards), "items": len(manifest.items),
            "problems": problems, "unlisted_shards": extra, "ok": not problems}

