"""`make demo`: the main job end to end on generated data, printing captions and metrics."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(workdir: str = "demo_out", images: int = 1500, epochs: int = 12, seed: int = 0) -> dict:
    from captioner.config import load_config
    from captioner.evaluate import evaluate
    from captioner.synthetic import generate
    from captioner.train import train

    t0 = time.time()
    wd = Path(workdir)
    data = wd / "data"
    if not (data / "results.csv").exists():
        generate(data, images=images, seed=seed)
    cfg = load_config("tiny-cpu", [f"--data.source={data}", f"--train.out_dir={wd / 'run'}",
                                   f"--train.epochs={epochs}"])
    res = train(cfg)
    ev = evaluate(str(res.out_dir / "ckpt_best.pt"), split="test", out_dir=str(wd / "eval_test"))
    print("\n=== captions for 5 held-out test images (PyTorch, greedy) ===")
    for r in ev["records"][:5]:
        print(f"{r.image_id}: {ev['captions'][r.image_id]!r}\n    reference: {r.captions[0]!r}")
    print("\n=== test metrics ===")
    print(json.dumps(ev["metrics"], indent=2))
    print(f"\nartefacts: {wd.resolve()} (samples: {ev['out_dir']}/samples.html); {time.time() - t0:.0f}s")
    return ev
