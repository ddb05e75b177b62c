"""Held-out images of a training config's dataset: the records of its test split (then val)
and their bytes, with generated scenes where the data is out of reach. For checks that need
real inputs (export's parity check, serving tests, benchmarks); takes the data config, not a
checkpoint, so nothing here needs the model."""
from __future__ import annotations

import io
import logging
import random
import tempfile
from pathlib import Path

from captioner.core.config import DataConfig
from captioner.data.manifest import is_shard_source, materialize, open_shard_source
from captioner.data.sources import assign_splits, by_split, read_records
from captioner.data.synthetic import draw_scene

log = logging.getLogger(__name__)


def held_out_records(data: DataConfig, n: int = 0, cache_dir: str | Path | None = None) -> list:
    """The held-out images of the dataset `data` names (test split, then val when too few; n=0:
    the whole test split) as ImageRecords: for a dataset written by `captioner ingest` the split
    is the one its manifest fixes (images extracted to `cache_dir`), else the split
    `assign_splits` gives."""
    if is_shard_source(data.source):
        store, manifest = open_shard_source(data.source)
        cache = Path(cache_dir or tempfile.mkdtemp(prefix="captioner-heldout-"))
        recs = materialize(store, manifest, "test", cache / "test", n)
        if n and len(recs) < n:
            recs += materialize(store, manifest, "val", cache / "val", n - len(recs))
        return recs
    recs, _ = read_records(data.source, data.format, data.image_root)
    assign_splits(recs, data.val_fraction, data.test_fraction, data.split_seed)
    return (by_split(recs, "test") + by_split(recs, "val"))[:n] if n else by_split(recs, "test")


def sample_images(data: DataConfig, n: int = 8) -> list[tuple[str, bytes]]:
    """n held-out images (name, encoded bytes) of the dataset `data` names (its manifest's test
    split for a shard dataset) when reachable, else generated scenes."""
    try:
        out = [(r.image_id, Path(r.path).read_bytes()) for r in held_out_records(data, n)]
        if out:
            return out
    except Exception as e:  # noqa: BLE001 - fall back to generated images
        log.info("held-out images: data source unavailable (%s); using generated images", e)
    rng, out = random.Random(0), []
    for i in range(n):
        img, _ = draw_scene(rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((f"generated-{i}.jpg", buf.getvalue()))
    return out


