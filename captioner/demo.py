"""`make demo`: the main job end to end on generated data: generate -> train -> evaluate ->
export -> serve -> caption through tritonclient, printing captions and metrics."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(workdir: str = "demo_out", images: int = 1500, epochs: int = 8, seed: int = 0) -> dict:
    from captioner.client import caption_bytes, wait_ready
    from captioner.config import load_config
    from captioner.evaluate import evaluate
    from captioner.export import export
    from captioner.synthetic import attribute_accuracy, generate
    from captioner.train import train

    t0 = time.time()
    wd = Path(workdir)
    data = wd / "data"
    if not (data / "results.csv").exists():
        generate(data, images=images, seed=seed)
    cfg = load_config("tiny-cpu", [f"--data.source={data}", f"--train.out_dir={wd / 'run'}",
                                   f"--train.epochs={epochs}"])
    res = train(cfg)
    ckpt = res.out_dir / "ckpt_best.pt"
    ev = evaluate(str(ckpt), split="test", out_dir=str(wd / "eval_test"))
    report = export(str(ckpt), str(wd / "model_repository"), device="cpu")

    port = _free_port()
    url = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "captioner", "serve", str(wd / "model_repository"),
                               "--grpc-port", str(port)], env=os.environ.copy())
    try:
        wait_ready(url, timeout=120)
        held_out = ev["records"][:5]
        served = caption_bytes(url, [Path(r.path).read_bytes() for r in held_out])
    finally:
        server.terminate()
        server.wait(timeout=30)

    print("\n=== 5 held-out test images, captioned through tritonclient gRPC by `captioner serve` ===")
    for r, cap in zip(held_out, served):
        same = "same as PyTorch" if cap == ev["captions"][r.image_id] else f"PyTorch: {ev['captions'][r.image_id]!r}"
        print(f"{r.image_id}: {cap!r} ({same})\n    reference: {r.captions[0]!r}")
    p = report["parity"]
    print(f"\nONNX parity: encoder max|diff| {p['encoder_max_abs_diff']:.1e}, logits max|diff| "
          f"{p['logits_max_abs_diff']:.1e}, greedy captions equal {p['captions_equal']}/{p['images']}")
    print(f"\n=== test metrics ({len(ev['records'])} held-out images, greedy) ===")
    print(json.dumps({k: round(v, 4) for k, v in ev["metrics"].items()}, indent=2))
    acc = attribute_accuracy({r.image_id: r.captions for r in ev["records"]}, ev["captions"])
    print("attribute accuracy (the generator knows the truth; an attribute left out counts as wrong): "
          + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    print(f"\nartefacts under {wd.resolve()}: run/ (checkpoints), eval_test/samples.html, model_repository/; "
          f"{time.time() - t0:.0f}s")
    return ev
