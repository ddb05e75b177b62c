"""`captioner bench WHAT ARGS`: run one of the benchmarks in captioner/bench/."""
from __future__ import annotations

import argparse
import sys


def cmd_bench(a, _):
    import importlib

    mod = {"train": "captioner.bench.train_throughput", "latency": "captioner.bench.caption_latency",
           "ingest": "captioner.bench.ingest_throughput", "serve": "captioner.bench.serve_throughput",
           "quality": "captioner.bench.quantized_quality", "int8": "captioner.bench.quantized_quality"}[a.what]
    prog, sys.argv[0] = sys.argv[0], f"captioner bench {a.what}"  # the usage line of parsers without a prog
    try:
        importlib.import_module(mod).main(a.rest)
    finally:
        sys.argv[0] = prog


def add_bench(sub, common: dict) -> None:
    s = sub.add_parser("bench", **common, help="benchmarks (print side-by-side measurements)")
    s.add_argument("what", choices=["train", "latency", "ingest", "serve", "quality", "int8"],
                   metavar="{train,latency,ingest,serve,quality}",
                   help="train: encode-once vs per-pair throughput; latency: caption latency/throughput of the "
                        "no-cache baseline, PyTorch+KV cache, onnxruntime fp32/int8/int4 (served path), HF generate, "
                        "and each served path's memory roofline; "
                        "ingest: S3 ingest and loader speed; serve: images/s and p50/p99 at concurrency 1, 8, 32 "
                        "through tritonclient against `captioner serve`, as a share of the encoder-bound ceiling; "
                        "quality (alias int8): int8 and int4 vs fp32 CIDEr-D and caption agreement on a run's "
                        "held-out test split")
    s.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="passed to the benchmark (try `captioner bench latency --help`)")
    s.set_defaults(fn=cmd_bench)
