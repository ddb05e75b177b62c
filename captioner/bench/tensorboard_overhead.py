"""Does the TensorBoard writer slow training? `captioner train` with the `tiny-cpu` preset on
generated images, once with `train.tensorboard` on and once off, side by side in one process
(one run each; the order alternates with --swap to rule out warm-up effects). Prints the
training pairs/s of each (caption pairs of all epochs / wall time of train(), validation
included, since the writer adds its val loss and sample images there) and their ratio.

    python -m captioner.bench.tensorboard_overhead [--images 300] [--epochs 2] [--swap]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--swap", action="store_true", help="run without the writer first")
    a = ap.parse_args(argv)

    from captioner.core.config import load_config
    from captioner.data.synthetic import generate
    from captioner.training.train import DistInfo, prepare_data, train

    res = {}
    with tempfile.TemporaryDirectory(prefix="captioner-bench-tb-") as tmp:
        data = Path(tmp) / "data"
        generate(data, images=a.images, seed=0, progress=False)
        order = [False, True] if a.swap else [True, False]
        for on in order:
            cfg = load_config("tiny-cpu", [f"--data.source={data}", f"--train.out_dir={tmp}/run-{on}",
                                           f"--train.epochs={a.epochs}", f"--train.tensorboard={str(on).lower()}",
                                           "--train.val_max_images=32", "--data.num_workers=0"])
            recs = prepare_data(cfg, DistInfo(), progress=False)[0]
            pairs = sum(len(r.captions) for r in recs) * a.epochs
            t0 = time.perf_counter()
            train(cfg, progress=False)
            dt = time.perf_counter() - t0
            res["with writer" if on else "without writer"] = pairs / dt
    for k, v in res.items():
        print(f"{k:<16} {v:8.1f} pairs/s")
    print(f"with/without: {res['with writer'] / res['without writer']:.3f}")
    return res


if __name__ == "__main__":
    main()
