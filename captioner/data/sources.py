"""Dataset readers (Kaggle Flickr30k CSV, Karpathy split JSON, COCO captions JSON, an image
folder with a Hugging Face ImageFolder `metadata.jsonl`, a plain `image,caption` CSV), the
image-level split and the evaluation arrays. Torch-free (`captioner ingest` reads through
here); the torch Dataset/collate/sampler used by training are in `captioner.data.datasets`.

Bad rows never stop a run: each is skipped with a warning naming it and counted in the
`DataSummary`. Image names are untrusted: a name that is absolute or climbs out of the image
root (`../`) is refused ("image path outside the image folder"), never read.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from captioner.core.errors import DataNotFoundError
from captioner.core.preprocess import ImageError, PreprocessConfig, load_image, preprocess_path

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
OUTSIDE = "image path outside the image folder"


@dataclass
class ImageRecord:
    image_id: str  # file name as the dataset names it, e.g. "1000092795.jpg"
    path: str  # where the bytes are (local path)
    captions: list[str]
    split: str = ""  # train | val | test; "" until assigned


@dataclass
class DataSummary:
    images: int = 0
    captions: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> [item names]
    repaired: list = field(default_factory=list)

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        self.skipped.setdefault(reason, []).append(item)
        log.warning("skipping %s: %s%s", item, reason, f" ({detail})" if detail else "")

    def to_dict(self) -> dict:
        return {"images": self.images, "captions": self.captions,
                "skipped": {k: {"count": len(v), "items": v[:50]} for k, v in self.skipped.items()},
                "repaired_rows": self.repaired[:50]}

    def text(self) -> str:
        sk = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items()) or "none"
        return f"{self.images} images, {self.captions} captions; skipped: {sk}"


# ------------------------------------------------------------------ readers
_MALFORMED = re.compile(r"^\s*(\d+)\s+(.*\S)\s*$")


def read_flickr30k_csv(csv_path: str | Path, image_dir: str | Path, summary: DataSummary) -> list[ImageRecord]:
    """Kaggle Flickr30k `results.csv`: `image_name| comment_number| comment`.

    Handles stray spaces, a missing header, and the public file's known malformed row
    (`2199200615.jpg| 4 A dog runs across the grass .`: the second `|` is missing)."""
    image_dir = Path(image_dir)
    caps: OrderedDict[str, list[str]] = OrderedDict()
    with open(csv_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split("|", 2)]
            if lineno == 1 and parts[0].lower() == "image_name":
                continue
            item = f"{Path(csv_path).name}:{lineno}"
            if len(parts) == 2 and (m := _MALFORMED.match(parts[1])):
                parts = [parts[0], m.group(1), m.group(2)]
                summary.repaired.append(item)
                log.warning("repaired malformed row %s: %r", item, line)
            if len(parts) < 3 or not parts[0]:
                summary.skip("malformed row", item, repr(line[:80]))
                continue
            name, _, cap = parts
            if not cap or not re.search(r"\w", cap):
                summary.skip("empty caption", f"{name} ({item})")
                caps.setdefault(name, [])
                continue
            caps.setdefault(name, []).append(cap)
    return _finish(caps, lambda n: _inside(image_dir, n), summary)


def _inside(root: str | Path, *names: str) -> Path | None:
    """root/names... when that stays inside root (after resolving links), else None."""
    parts = [p for n in names for p in str(n).replace("\\", "/").split("/")]
    if any(str(n).startswith(("/", "\\")) for n in names) or ".." in parts:
        return None
    base = Path(root).resolve()
    p = (base / "/".join(x for x in parts if x not in ("", "."))).resolve()
    return p if base in p.parents else None


def read_karpathy_json(json_path: str | Path, image_root: str | Path, summary: DataSummary) -> list[ImageRecord]:
    """Karpathy split JSON (dataset_flickr30k.json / dataset_coco.json): images[].filename,
    optional filepath (COCO: train2014/val2014), split (restval counts as train), sentences[].raw."""
    data = json.loads(Path(json_path).read_text())
    root = Path(image_root)
    caps: OrderedDict[str, list[str]] = OrderedDict()
    splits, paths = {}, {}
    for im in data["images"]:
        name = im["filename"]
        paths[name] = _inside(root, im.get("filepath", ""), name)
        sp = im.get("split", "")
        splits[name] = "train" if sp == "restval" else sp
        good = []
        for s in im.get("sentences", []):
            raw = (s.get("raw") or " ".join(s.get("tokens", []))).strip()
            if raw:
                good.append(raw)
            else:
                summary.skip("empty caption", name)
        caps[name] = good
    recs = _finish(caps, lambda n: paths[n], summary)
    for r in recs:
        r.split = splits.get(r.image_id, "")
    return recs


def read_coco_json(json_path: str | Path, image_root: str | Path, summary: DataSummary) -> list[ImageRecord]:
    """COCO captions JSON: images[{id, file_name}], annotations[{image_id, caption}]."""
    data = json.loads(Path(json_path).read_text())
    root = Path(image_root)
    names = {im["id"]: im["file_name"] for im in data["images"]}
    caps: OrderedDict[str, list[str]] = OrderedDict((n, []) for n in names.values())
    for a in data.get("annotations", []):
        name = names.get(a.get("image_id"))
        if name is None:
            summary.skip("caption for unknown image id", str(a.get("image_id")))
            continue
        c = (a.get("caption") or "").strip()
        if c:
            caps[name].append(c)
        else:
            summary.skip("empty caption", name)
    return _finish(caps, lambda n: _inside(root, n), summary)


def _add_caption(caps: dict, name, text, item: str, summary: DataSummary) -> None:
    """One caption row of the simple forms: a missing name is a malformed row, an empty
    caption is counted (the image stays if it has others)."""
    if not isinstance(name, str) or not name.strip():
        summary.skip("malformed row", item, "no image file name")
        return
    name = name.strip()
    texts = text if isinstance(text, list) else [text]
    for t in texts:
        t = t.strip() if isinstance(t, str) else ""
        if t and re.search(r"\w", t):
            caps.setdefault(name, []).append(t)
        else:
            summary.skip("empty caption", f"{name} ({item})")
            caps.setdefault(name, [])


def read_imagefolder(meta_path: str | Path, image_root: str | Path, summary: DataSummary) -> list[ImageRecord]:
    """Hugging Face ImageFolder captions: `metadata.jsonl` next to the images, one JSON object
    a line with `file_name` (relative to the metadata file's folder) and `text` (a caption or a
    list of them; `caption` is accepted too). Several lines may name the same image."""
    meta_path = Path(meta_path)
    caps: OrderedDict[str, list[str]] = OrderedDict()
    with open(meta_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = f"{meta_path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                summary.skip("malformed row", item, str(e))
                continue
            if not isinstance(row, dict):
                summary.skip("malformed row", item, "not a JSON object")
                continue
            _add_caption(caps, row.get("file_name"), row.get("text", row.get("caption")), item, summary)
    return _finish(caps, lambda n: _inside(image_root, n), summary)


def read_caption_csv(csv_path: str | Path, image_root: str | Path, summary: DataSummary) -> list[ImageRecord]:
    """A plain CSV with an `image,caption` header (quoted as spreadsheets write it), one
    caption a row, image paths relative to the CSV's folder (or image_root)."""
    csv_path = Path(csv_path)
    caps: OrderedDict[str, list[str]] = OrderedDict()
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = csv.reader(f)
        header = [h.strip().lower() for h in next(rows, [])]
        if "image" not in header or "caption" not in header:
            raise ValueError(f"{csv_path}: expected a header row naming the columns image and caption, got "
                             f"{','.join(header)!r}")
        ii, ci = header.index("image"), header.index("caption")
        for lineno, row in enumerate(rows, 2):
            if not any(c.strip() for c in row):
                continue
            item = f"{csv_path.name}:{lineno}"
            if len(row) <= max(ii, ci):
                summary.skip("malformed row", item, repr(",".join(row)[:80]))
                continue
            _add_caption(caps, row[ii], row[ci], item, summary)
    return _finish(caps, lambda n: _inside(image_root, n), summary)


def _finish(caps: dict, path_of, summary: DataSummary) -> list[ImageRecord]:
    recs = []
    for name, cs in caps.items():
        p = path_of(name)
        if not cs:
            summary.skip("image without captions", name)
            continue
        if p is None:
            summary.skip(OUTSIDE, name)
            continue
        if not p.is_file():
            summary.skip("missing image file", name, str(p))
            continue
        recs.append(ImageRecord(name, str(p), cs))
    return recs


FORMATS = ("flickr30k", "karpathy", "coco", "imagefolder", "csv")
LAYOUTS = ("a Kaggle Flickr30k folder (results.csv + flickr30k_images/), an image folder with a metadata.jsonl "
           "(file_name, text), a CSV with an image,caption header, a Karpathy split JSON or a COCO captions JSON")


def _csv_kind(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.readline()
    return "flickr30k" if "|" in head or not head.strip() else "csv"


def detect_format(source: Path) -> str:
    if source.is_dir():
        if (source / "results.csv").exists():
            return "flickr30k"
        if (source / "metadata.jsonl").exists():
            return "imagefolder"
        csvs = sorted(source.glob("*.csv"))
        if len(csvs) == 1 and _csv_kind(csvs[0]) == "csv":
            return "csv"
        raise ValueError(f"data source {source} is a folder without results.csv or metadata.jsonl; expected {LAYOUTS}")
    if source.suffix == ".csv":
        return _csv_kind(source)
    if source.suffix == ".jsonl":
        return "imagefolder"
    if source.suffix == ".json":
        head = json.loads(source.read_text())
        if "annotations" in head:
            return "coco"
        if "images" in head and head["images"] and "sentences" in head["images"][0]:
            return "karpathy"
        raise ValueError(f"{source}: JSON is neither Karpathy split nor COCO captions format")
    raise ValueError(f"cannot tell the format of data source {source}")


def _flickr_image_dir(root: Path) -> Path:
    d = root / "flickr30k_images"
    if (d / "flickr30k_images").is_dir():  # Kaggle zip nests the folder once more
        return d / "flickr30k_images"
    return d if d.is_dir() else root


def read_records(source: str | Path, fmt: str = "auto", image_root: str = "", summary: DataSummary | None = None,
                 max_images: int = 0) -> tuple[list[ImageRecord], DataSummary]:
    summary = summary or DataSummary()
    src = Path(source)
    if not src.exists():
        raise DataNotFoundError(f"data source not found: {src}",
                                hint=f"point --data.source at {LAYOUTS}; to try things out first, "
                                     f"`captioner generate-data {src}` writes generated images there")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "flickr30k":
        root = src if src.is_dir() else src.parent
        csv_path = src / "results.csv" if src.is_dir() else src
        recs = read_flickr30k_csv(csv_path, Path(image_root) if image_root else _flickr_image_dir(root), summary)
    elif fmt == "karpathy":
        recs = read_karpathy_json(src, image_root or _flickr_image_dir(src.parent), summary)
    elif fmt == "coco":
        recs = read_coco_json(src, image_root or src.parent, summary)
    elif fmt == "imagefolder":
        meta = src / "metadata.jsonl" if src.is_dir() else src
        recs = read_imagefolder(meta, image_root or meta.parent, summary)
    elif fmt == "csv":
        path = src if not src.is_dir() else next(iter(sorted(src.glob("*.csv"))), src / "captions.csv")
        recs = read_caption_csv(path, image_root or path.parent, summary)
    else:
        raise ValueError(f"unknown data format {fmt!r} (auto|{'|'.join(FORMATS)})")
    if max_images:
        recs = recs[:max_images]
    return recs, summary


def verify_images(recs: list[ImageRecord], summary: DataSummary, max_pixels: int, workers: int = 4,
                  progress: bool = True) -> list[ImageRecord]:
    """Decode every image once (JPEG at reduced scale, which is fast) and drop the ones
    that are corrupt, truncated, not images, or too large."""
    def check(r: ImageRecord):
        try:
            load_image(r.path, max_pixels, name=r.image_id, draft_size=(64, 64))
            return None
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as ex:
        errors = list(tqdm(ex.map(check, recs), total=len(recs), desc="verify images", unit="img",
                           disable=not progress, leave=False))
    good = []
    for r, err in zip(recs, errors):
        if err:
            summary.skip("unreadable image", r.image_id, err)
        else:
            good.append(r)
    return good


# ------------------------------------------------------------------ splits
def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def assign_splits(recs: list[ImageRecord], val_fraction: float, test_fraction: float, seed: int = 0) -> None:
    """Split by *image*: every caption of an image lands in the image's split. Records that
    already carry a split (Karpathy JSON) keep it. The hash makes an image's split stable
    when images are added or removed."""
    for r in recs:
        if r.split in SPLITS:
            continue
        u = _unit_hash(f"{seed}:{r.image_id}")
        r.split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def by_split(recs: Iterable[ImageRecord], split: str) -> list[ImageRecord]:
    return [r for r in recs if r.split == split]


def summarize(recs: list[ImageRecord], summary: DataSummary) -> DataSummary:
    summary.images = len(recs)
    summary.captions = sum(len(r.captions) for r in recs)
    summary.per_split = dict(Counter(r.split for r in recs))  # type: ignore[attr-defined]
    return summary


def load_split_arrays(recs: list[ImageRecord], pre: PreprocessConfig) -> tuple[np.ndarray, list[ImageRecord]]:
    """Preprocess a list of records (for evaluation); bad images are skipped with a warning."""
    xs, keep = [], []
    for r in recs:
        try:
            xs.append(preprocess_path(r.path, pre, name=r.image_id))
            keep.append(r)
        except ImageError as e:
            log.warning("skipping %s", e)
    _, H, W = pre.input_size
    return (np.stack(xs) if xs else np.zeros((0, 3, H, W), np.float32)), keep
