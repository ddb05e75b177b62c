"""Training throughput: encode each image once for all of its captions vs one encoder pass
per (image, caption) pair, side by side in one run, on the `seed-vit768` shape; and the
read amplification of the shard loader (bytes read per epoch / data bytes).

    python -m captioner.bench.train_throughput [--images 2] [--captions 5] [--steps 3]
    python -m captioner.bench.train_throughput --read-only   # the read-amplification table only

Prints pairs/s for both, their FLOPs per pair (torch.utils.flop_counter, forward+backward)
and the ratios. Random weights and inputs: only speed is measured.

Read amplification: a generated set is ingested into a local folder as one shard, a few
shards, and `--shard-mb auto` shards for the layout; every (rank, worker) reader of one
epoch streams its part through a store that counts the bytes it hands out, as a local
folder (seekable: unwanted members are seeked over) and as an object store would (a
stream: read through). Bytes are counted, not timed.
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.core.config import load_config
from captioner.io.storage import LocalStore
from captioner.modeling.model import Captioner
from captioner.core.preprocess import PreprocessConfig


class CountingStore(LocalStore):
    """A local store that counts the bytes its readers get; `seekable=False` makes it
    behave like an object-store download (a stream that can only be read through)."""

    def __init__(self, root, seekable: bool = True):
        super().__init__(root)
        self.bytes_read, self.can_seek = 0, seekable

    def open(self, key):
        store, f = self, super().open(key)

        class Counting(io.RawIOBase):
            def readable(self):
                return True

            def seekable(self):
                return store.can_seek

            def readinto(self, b):
                n = f.readinto(b)
                store.bytes_read += n or 0
                return n

            def seek(self, off, whence=0):
                if not store.can_seek:
                    raise io.UnsupportedOperation("stream")
                return f.seek(off, whence)

            def tell(self):
                return f.tell()

            def close(self):
                f.close()
                super().close()

        return io.BufferedReader(Counting())  # the buffer open() gives a local file


class _NoTokens:
    """Captions are not needed to count bytes."""

    def encode(self, text, max_len):
        return []


def bytes_read_ratio(root: Path, world: int, workers: int, seekable: bool) -> tuple[float, int]:
    """(bytes read by all readers of one epoch / train shard bytes, train shards)."""
    from captioner.data.manifest import Manifest
    from captioner.data.shards import ShardStream

    store = CountingStore(root, seekable)
    m = Manifest.load(store)
    for rank in range(world):
        ds = ShardStream(store, m, "train", _NoTokens(), None, 16, 32, rank, world, 0, 100, workers)
        for w in range(max(1, workers)):
            for _ in ds._stream(w):
                pass
    shards = m.shards_in("train")
    return store.bytes_read / sum(s.size for s in shards), len(shards)


def read_amplification(images: int = 400, layouts=((2, 2), (8, 4)), keep: str = "") -> dict:
    import tempfile

    from captioner.data.ingest import IngestOptions, ingest
    from captioner.data.synthetic import generate

    res = {}
    with tempfile.TemporaryDirectory(prefix="captioner-readamp-") as tmp:
        src = Path(tmp) / "src"
        generate(src, images=images, seed=0, side=256, progress=False)  # ~20 KB JPEGs
        print(f"\nread amplification: {images} generated 256 px images; bytes read by all readers in one epoch / "
              "train data bytes")
        print(f"{'layout':<22} {'shards':<26} {'n':>4} {'local (seek)':>13} {'stream (S3)':>12}")
        for world, workers in layouts:
            readers = world * max(1, workers)
            for label, opts in (("one (--shard-mb 64)", {"shard_mb": 64.0}),
                                ("two", {"shard_mb": 1e9, "shard_items": int(images * 0.9) // 2 + 1}),
                                (f"auto for {readers} readers", {"shard_mb": "auto", "target_workers": readers})):
                dest = Path(keep or tmp) / f"{label.split()[0]}-{readers}"
                if not (dest / "manifest.json").exists():
                    ingest(str(src), str(dest), IngestOptions(progress=False, **opts))
                local, n = bytes_read_ratio(dest, world, workers, True)
                stream, _ = bytes_read_ratio(dest, world, workers, False)
                res[(world, workers, label)] = {"shards": n, "local": local, "stream": stream}
                print(f"W={world} x {workers} workers{'':<5} {label:<26} {n:>4} {local:>12.2f}x {stream:>11.2f}x")
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-vit768")
    ap.add_argument("--images", type=int, default=2, help="images per step (reduced batch)")
    ap.add_argument("--captions", type=int, default=5, help="captions per image (Flickr30k: 5)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--read-only", action="store_true", help="only the shard read-amplification table")
    ap.add_argument("--read-images", type=int, default=400, help="generated images for the read-amplification table")
    ap.add_argument("--keep-data", default="", metavar="DIR",
                    help="keep the ingested sets in DIR (default: a temp dir)")
    a = ap.parse_args(argv)
    amp = read_amplification(a.read_images, keep=a.keep_data)
    if a.read_only:
        return {"read_amplification": amp}

    torch.manual_seed(0)
    cfg = load_config(a.config)
    cfg.model.vocab_size = a.vocab
    model = Captioner(cfg.model)
    pre = PreprocessConfig.from_model(model.encoder.backbone)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, K, T = a.images, a.captions, cfg.model.max_len
    images = torch.randn(B, *pre.input_size)
    tokens = torch.randint(4, a.vocab, (B * K, T))
    index = torch.arange(B).repeat_interleave(K)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    images, tokens, index = images.to(dev), tokens.to(dev), index.to(dev)

    variants = {
        "encode once per image": lambda: model(images, tokens, index)[1],
        "encoder pass per pair": lambda: model(images[index], tokens)[1],
    }

    def train_step(fn):
        loss = fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops, times = {}, {k: [] for k in variants}
    for name, fn in variants.items():
        with FlopCounterMode(display=False) as fc:
            fn().backward()
        opt.zero_grad(set_to_none=True)
        flops[name] = fc.get_total_flops() / (B * K)
        train_step(fn)  # warm-up
    for _ in range(a.steps):  # interleave the variants so drift hits both alike
        for name, fn in variants.items():
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(fn)
            if dev == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)

    print(f"\n{a.config} shape: {cfg.model.encoder} {cfg.model.encoder_kwargs} + {cfg.model.n_layers}-layer "
          f"{cfg.model.d_model}-d decoder; {B} images x {K} captions = {B * K} pairs/step, T={T}, device {dev}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<24} {'pairs/s':>9} {'GFLOPs/pair':>12}")
    res = {}
    for name in variants:
        med = sorted(times[name])[len(times[name]) // 2]
        res[name] = {"pairs_per_s": B * K / med, "gflops_per_pair": flops[name] / 1e9}
        print(f"{name:<24} {B * K / med:>9.2f} {flops[name] / 1e9:>12.2f}")
    once, per = res["encode once per image"], res["encoder pass per pair"]
    print(f"speed-up (pairs/s): {once['pairs_per_s'] / per['pairs_per_s']:.2f}x; "
          f"FLOPs per pair ratio: {per['gflops_per_pair'] / once['gflops_per_pair']:.2f}x fewer with encode-once")
    return res


if __name__ == "__main__":
    main()
