"""Training throughput: encode each image once for all of its captions vs one encoder pass
per (image, caption) pair, side by side in one run, on the `seed-vit768` shape.

    python -m benchmarks.train_throughput [--images 2] [--captions 5] [--steps 3]

Prints pairs/s for both, their FLOPs per pair (torch.utils.flop_counter, forward+backward)
and the ratios. Random weights and inputs: only speed is measured.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.config import load_config
from captioner.model import Captioner
from captioner.preprocess import PreprocessConfig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-vit768")
    ap.add_argument("--images", type=int, default=2, help="images per step (reduced batch)")
    ap.add_argument("--captions", type=int, default=5, help="captions per image (Flickr30k: 5)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--vocab", type=int, default=8000)
    a = ap.parse_args(argv)

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
