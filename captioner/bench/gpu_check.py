"""GPU check: run on a CUDA machine and record what it prints. It needs a GPU;
without one it says so and exits 2 (it has not been run in development: no GPU was available).

    python -m captioner.bench.gpu_check [--peak-tflops 989] [--steps 10] [--json]

1. Training MFU, bf16 autocast + torch.compile, on the `seed-vit768` and `vit-b16-a100`
   shapes (random weights, no download), encode-once vs one encoder pass per caption pair:
   MFU = (model FLOPs per step, counted by torch.utils.flop_counter on the eager model,
   forward+backward) / step time / peak bf16 FLOP/s (`--peak-tflops`: H100 SXM dense 989,
   A100 312). Goal: >= 40%.
2. onnxruntime CUDA caption latency at batch 1 and 32 through the generation path Triton
   serves: the exported encoder, then decode_loop's in-process step graph
   (`DecodeLoop.in_process`: I/O binding, KV cache on the GPU), greedy, EOS disabled, for an
   fp32 step graph (cache appended) and an fp16 one (`--decoder-dtype float16`: cache in place).
   Goal on an A100/H100: <= 10 ms per caption at batch 1. Needs onnxruntime-gpu
   (`captioner[serve-gpu]`) in place of onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def training_mfu(config: str, peak_tflops: float, images: int, captions: int, steps: int, vocab: int) -> dict:
    from captioner.core.config import load_config
    from captioner.modeling.encoders import resolve_preprocess
    from captioner.modeling.model import Captioner

    torch.manual_seed(0)
    cfg = load_config(config)
    cfg.model.vocab_size, cfg.model.pretrained, cfg.model.encoder_weights = vocab, False, ""
    model = Captioner(cfg.model).cuda()
    pre = resolve_preprocess(model.encoder.backbone)
    B, K, T = images, captions, cfg.model.max_len
    x = torch.randn(B, *pre.input_size, device="cuda")
    tok = torch.randint(4, vocab, (B * K, T), device="cuda")
    idx = torch.arange(B, device="cuda").repeat_interleave(K)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(model)
    out = {}
    for name, args in (("encode once per image", (x, tok, idx)), ("encoder pass per pair", (x[idx], tok))):
        with FlopCounterMode(display=False) as fc:
            model(*args)[1].backward()
        opt.zero_grad(set_to_none=True)
        flops = fc.get_total_flops()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(*args)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # compile + warm-up
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        out[name] = {"pairs_per_s": B * K / dt, "step_ms": dt * 1e3, "tflops_per_step": flops / 1e12,
                     "mfu": flops / dt / (peak_tflops * 1e12)}
    return out


def ort_latency(config: str, vocab: int, batches=(1, 32), runs: int = 20, decoder_dtype: str = "float32") -> dict:
    import onnxruntime as ort

    from captioner.bench.caption_latency import NO_EOS, random_model, save_random
    from captioner.core.decoding import greedy
    from captioner.core.names import DECODE_LOOP
    from captioner.export.exporter import export
    from captioner.serving.core import DecodeLoop
    from captioner.serving.onnx_runtime import OrtCaptioner

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (captioner[serve-gpu])")
    cfg, model, tok, pre = random_model(config, vocab)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        ck = save_random(work, cfg, model, tok, pre)
        export(str(ck), str(work / "repo"), device="gpu", verify=False, max_batch=max(batches),
               decoder_dtype=decoder_dtype)
        enc = OrtCaptioner(work / "repo")
        loop = DecodeLoop.in_process(work / "repo" / DECODE_LOOP / "1")
        assert enc.encoder.get_providers()[0] == "CUDAExecutionProvider"
        n_tok = min(20, cfg.model.max_len - 1)
        res = {}
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, *pre.input_size)).astype(np.float32)

            def caption():
                _, cross = enc.run_encoder(x)
                return greedy(loop.make_step(cross), b, tok.bos_id, NO_EOS, n_tok)

            for _ in range(3):
                caption()
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                caption()
                ts.append(time.perf_counter() - t0)
            med = statistics.median(ts)
            res[f"batch {b}"] = {"ms_per_batch": med * 1e3, "ms_per_caption": med * 1e3 / b, "captions_per_s": b / med}
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="captioner.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of this GPU")
    ap.add_argument("--images", type=int, default=32, help="images per training step")
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (it was not run in development)",
              file=sys.stderr)
        raise SystemExit(2)
    res = {"device": torch.cuda.get_device_name(0), "peak_tflops": a.peak_tflops}
    if not a.skip_train:
        for config in ("seed-vit768", "vit-b16-a100"):
            res[f"train {config}"] = training_mfu(config, a.peak_tflops, a.images, a.captions, a.steps, a.vocab)
    if not a.skip_ort:
        for dtype in ("float32", "float16"):  # fp32: cache appended; fp16: half the bytes, cache in place
            res[f"onnxruntime CUDA seed-vit768, decoder {dtype}"] = ort_latency("seed-vit768", a.vocab,
                                                                                decoder_dtype=dtype)
    if a.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
