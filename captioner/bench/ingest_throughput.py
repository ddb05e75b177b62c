"""Ingest into a real S3 server on 127.0.0.1 (moto_server), side by side in one run:

  (a) the inspiration's way: one PUT per image, sequential (`fput_object` per file)
  (b) `captioner ingest`: validated, packed into tar shards, parallel uploads

and the training data-loader throughput (caption pairs/s) from those shards vs from the
image folder. Needs `moto[server]` (the test extras).

    python -m captioner.bench.ingest_throughput [--images 2000] [--workers 8]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loader_pairs_per_s(loader, limit_batches: int) -> float:
    t0, pairs = time.perf_counter(), 0
    for i, b in enumerate(loader):
        if b is not None:
            pairs += b[1].shape[0]
        if i + 1 >= limit_batches:
            break
    return pairs / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--shard-mb", type=float, default=4.0)
    ap.add_argument("--loader-workers", type=int, default=2)
    a = ap.parse_args(argv)

    from captioner.core.preprocess import PreprocessConfig
    from captioner.core.tokenizer import CaptionTokenizer
    from captioner.data.datasets import CaptionImageDataset, ResumableBatchSampler, collate_grouped
    from captioner.data.ingest import IngestOptions, ingest
    from captioner.data.manifest import open_shard_source
    from captioner.data.shards import ShardStream
    from captioner.data.sources import assign_splits, by_split, read_records
    from captioner.data.synthetic import generate
    from captioner.io.storage import open_store

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    src = generate(work / "src", images=a.images, seed=1, side=256, progress=False)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.1)
    os.environ.update({"CAPTIONER_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench"})
    try:
        files = sorted((src / "flickr30k_images").glob("*.jpg"))
        naive = open_store("s3://naive/images", create=True)
        t0 = time.perf_counter()
        for f in files:  # (a): what the inspiration did
            naive.client.fput_object(naive.bucket, f"images/{f.name}", str(f))
        naive.client.fput_object(naive.bucket, "images/results.csv", str(src / "results.csv"))
        ta = time.perf_counter() - t0
        bytes_a = sum(f.stat().st_size for f in files) + (src / "results.csv").stat().st_size

        t0 = time.perf_counter()
        r = ingest(str(src), "s3://sharded/v1", IngestOptions(shard_mb=a.shard_mb, workers=a.workers, progress=False))
        tb = time.perf_counter() - t0

        print(f"\ningest of {a.images} generated images (256 px JPEG) into moto_server on 127.0.0.1")
        print(f"{'method':<42} {'objects':>8} {'MB':>8} {'seconds':>8} {'img/s':>8}")
        print(f"{'(a) one PUT per image, sequential':<42} {len(files) + 1:>8} {bytes_a / 1e6:>8.1f} {ta:>8.2f} "
              f"{a.images / ta:>8.1f}")
        print(f"{'(b) captioner ingest (validated, sharded)':<42} {r['shards'] + 1:>8} {r['bytes'] / 1e6:>8.1f} "
              f"{tb:>8.2f} {a.images / tb:>8.1f}")
        print(f"ratio (a)/(b) wall time: {ta / tb:.2f}x; objects {(len(files) + 1) / (r['shards'] + 1):.0f}x fewer")

        store, manifest = open_shard_source("s3://sharded/v1")
        tok = CaptionTokenizer.train([c for it in manifest.items for c in it.captions])
        pre = PreprocessConfig(input_size=(3, 64, 64))
        stream = ShardStream(store, manifest, "train", tok, pre, 20, 32, num_workers=a.loader_workers)
        sl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=a.loader_workers)
        recs, _ = read_records(src)
        assign_splits(recs, 0.05, 0.05)
        ds = CaptionImageDataset(by_split(recs, "train"), tok, pre, 20)
        fl = torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), 32), collate_fn=collate_grouped,
                                         num_workers=a.loader_workers)
        n = min(len(fl), stream.batches_per_rank())
        ps, pf = _loader_pairs_per_s(sl, n), _loader_pairs_per_s(fl, n)
        print(f"\ndata loader, {a.loader_workers} workers, batch 32 images (160 pairs), 64 px, {n} batches:")
        print(f"  from S3 shards:    {ps:8.0f} pairs/s\n  from image folder: {pf:8.0f} pairs/s\n"
              f"  ratio shards/folder: {ps / pf:.2f}x")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
