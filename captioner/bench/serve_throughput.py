"""`captioner serve` throughput under load: images/s and per-request p50/p99 latency at
concurrency 1, 8 and 32, one image per request, through tritonclient gRPC against a real
`captioner serve` process on 127.0.0.1 (dynamic batching: concurrent requests are decoded
together, up to the repository's max batch).

    python -m captioner.bench.serve_throughput [--config seed-vit768] [--quantize int4] [--levels 1,8,32] [--json]

Random weights of the preset's shape (exported locally, nothing downloaded); EOS can come
early with random weights, so every level captions the same images in the same order.

The ceiling: the exported encoder alone (onnxruntime, the server's thread count) at the served
batch size (the ensemble's max batch), timed in this run before the server starts: no served
caption can come faster than its image is encoded, so images/s at each level is also printed
as a share of batch / encoder time. Goals: >= 3x images/s at concurrency 32 vs 1 (dynamic batching pays);
concurrency 32 at >= 85% of the ceiling. CPU here: ratios, not GPU figures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, side: int) -> list[bytes]:
    import random

    from captioner.data.synthetic import draw_scene

    rng, out = random.Random(0), []
    for _ in range(n):
        img, _ = draw_scene(rng)
        buf = io.BytesIO()
        img.resize((side, side)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure(url: str, images: list[bytes], concurrency: int, requests: int) -> dict:
    from captioner.serving.client import caption_bytes  # one cached client per thread (client._client)

    lat: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        caption_bytes(url, [images[i % len(images)]], timeout=600)
        lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"concurrency": concurrency, "requests": requests, "images_per_s": requests / wall,
            "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def encoder_ceiling(repo: Path, pixels, threads: int, runs: int = 3) -> dict:
    """images/s of the repository's encoder alone on `pixels` (one batch at the served size),
    median of `runs` after a warm-up."""
    from captioner.serving.onnx_runtime import OrtCaptioner

    enc = OrtCaptioner(repo, threads)
    enc.run_encoder(pixels)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        enc.run_encoder(pixels)
        t.append(time.perf_counter() - t0)
    return {"batch": len(pixels), "encoder_ms": 1e3 * statistics.median(t),
            "images_per_s": len(pixels) / statistics.median(t)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="captioner.bench.serve_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-vit768")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--levels", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency (min 4)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads in the server (0 = all)")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None, help="export the repository quantized")
    ap.add_argument("--max-batch", type=int, default=0, help="served batch size (0 = export's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    from captioner.bench.caption_latency import random_model, save_random
    from captioner.export.exporter import export
    from captioner.serving.client import caption_bytes, wait_ready

    cfg, model, tok, pre = random_model(a.config, a.vocab)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    port = _free_port()
    url = f"127.0.0.1:{port}"
    server = None
    try:
        ck = save_random(work, cfg, model, tok, pre)
        del model
        print(f"exporting {a.config} (random weights) ...", file=sys.stderr, flush=True)
        export(str(ck), str(work / "repo"), device="cpu", verify=False, quantize=a.quantize,
               **({"max_batch": a.max_batch} if a.max_batch else {}))
        from captioner.core.limits import MAX_BATCH
        from captioner.serving.core import image_bytes_to_pixels

        images = _images(32, pre.input_size[1])
        batch = a.max_batch or MAX_BATCH
        ceiling = encoder_ceiling(work / "repo", image_bytes_to_pixels(
            np.array([images[i % len(images)] for i in range(batch)], dtype=object), pre), a.threads)
        log = open(work / "serve.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "captioner", "serve", str(work / "repo"), "--grpc-port",
                                   str(port), "--threads", str(a.threads)], stdout=log, stderr=subprocess.STDOUT,
                                  env=os.environ.copy())
        wait_ready(url, timeout=300, model="captioner")
        caption_bytes(url, images[:1], timeout=600)  # warm-up
        rows = [measure(url, images, c, max(4, a.rounds * c)) for c in (int(x) for x in a.levels.split(","))]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_first_level"] = r["images_per_s"] / base
        r["of_ceiling"] = r["images_per_s"] / ceiling["images_per_s"]
    from captioner.bench.caption_latency import cpu_flags

    if a.json:
        print(json.dumps({"config": a.config, "device": "cpu", "cpu_flags": cpu_flags(), "quantize": a.quantize,
                          "ceiling": ceiling, "rows": rows}))
        return rows
    print(f"{a.config}, random weights, {a.quantize or 'fp32'}, 1 image/request, `captioner serve` on 127.0.0.1, "
          f"CPU ({', '.join(cpu_flags()) or 'flags unknown'})")
    print(f"ceiling: encoder alone at batch {ceiling['batch']}: {ceiling['encoder_ms']:.0f} ms = "
          f"{ceiling['images_per_s']:.2f} images/s (measured in this run)")
    print("| concurrency | requests | images/s | vs c=1 | of ceiling | p50 (ms) | p99 (ms) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | {r['vs_first_level']:.2f}x | "
              f"{100 * r['of_ceiling']:.0f}% | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
