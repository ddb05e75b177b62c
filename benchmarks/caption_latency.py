"""Caption latency (batch 1) and throughput (batch 8), side by side in one run, on the
`seed-vit768` shape with random weights and 20-token captions:

  (a) the inspiration's algorithm: greedy, PyTorch eager, the whole decoder (cross-attention
      K/V included) recomputed over the padded sequence at every step, no cache
  (b) our PyTorch path: K/V cross-attention computed once per image, self-attention KV cache
  (c) our onnxruntime path (exported encoder + decoder with past key/values)
  (d) the same, onnxruntime dynamic int8

    python -m benchmarks.caption_latency [--config seed-vit768] [--runs 5]

EOS is disabled so every path generates exactly max_len-2 tokens (random weights).
Prints ratios against (a). Times include the image encoder.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import atomic_save
from captioner.config import load_config
from captioner.decoding import CachedStep, greedy
from captioner.export import export
from captioner.inference import torch_step
from captioner.model import Captioner
from captioner.onnx_runtime import OrtCaptioner
from captioner.preprocess import PreprocessConfig
from captioner.tokenizer import CaptionTokenizer

NO_EOS = -1


def baseline_caption(model: Captioner, images: torch.Tensor, bos: int, n_tokens: int) -> torch.Tensor:
    """The inspiration's loop: pad to full length, run the whole decoder every step."""
    B, T = images.shape[0], n_tokens + 1
    memory = model.encode(images)
    tokens = torch.zeros(B, T, dtype=torch.long)
    tokens[:, 0] = bos
    for t in range(n_tokens):
        cross = model.decoder.cross_kv(memory)  # recomputed every step, as the original did
        logits, _ = model.decoder(tokens, cross)  # full padded sequence, causal mask
        tokens[:, t + 1] = logits[:, t].argmax(-1)
    return tokens[:, 1:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-vit768")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", default=None, help="keep the exported repository here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(a.config)
    words = [f"w{i}" for i in range(a.vocab - 4)]
    tok = CaptionTokenizer.train([" ".join(words)], "wordlevel", vocab_size=a.vocab)
    cfg.model.vocab_size, cfg.model.pretrained = tok.vocab_size, False
    model = Captioner(cfg.model).eval()
    pre = PreprocessConfig.from_model(model.encoder.backbone)
    n_tok = min(20, cfg.model.max_len - 1)
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-"))
    ck = work / "ckpt.pt"
    atomic_save({"config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_str(),
                 "preprocess": pre.to_dict(), "step": 0}, ck)
    print(f"exporting {a.config} (random weights) to ONNX ...", flush=True)
    export(str(ck), str(work / "fp32"), device="cpu", verify=False)
    export(str(ck), str(work / "int8"), device="cpu", verify=False, quantize="int8")
    ort32, ort8 = OrtCaptioner(work / "fp32"), OrtCaptioner(work / "int8")

    def ours_torch(x):
        with torch.no_grad():
            _, cross = model.encode_for_decoding(x)
            return greedy(torch_step(model, cross), len(x), tok.bos_id, NO_EOS, n_tok)

    def ours_ort(o):
        def f(x):
            _, cross = o.run_encoder(x.numpy())
            past = np.zeros((len(x), 2 * cfg.model.n_layers, cfg.model.n_heads, 0,
                             cfg.model.d_model // cfg.model.n_heads), np.float32)
            return greedy(CachedStep(o.run_decoder, cross, past), len(x), tok.bos_id, NO_EOS, n_tok)
        return f

    def base(x):
        with torch.no_grad():
            return baseline_caption(model, x, tok.bos_id, n_tok).tolist()

    paths = {"(a) inspiration: no cache, eager": base, "(b) PyTorch + KV cache": ours_torch,
             "(c) onnxruntime + KV cache": ours_ort(ort32), "(d) onnxruntime int8": ours_ort(ort8)}
    x1 = torch.randn(1, *pre.input_size)
    xb = torch.randn(a.batch, *pre.input_size)
    ref = base(x1)
    assert ours_torch(x1) == ref, "KV-cache path must produce the baseline's tokens"
    res = {}
    for name, fn in paths.items():
        fn(x1)  # warm-up
        lat = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            out = fn(x1)
            lat.append(time.perf_counter() - t0)
        assert len(out[0]) == n_tok
        thr = []
        for _ in range(max(1, a.runs // 2)):
            t0 = time.perf_counter()
            fn(xb)
            thr.append(a.batch / (time.perf_counter() - t0))
        res[name] = (statistics.median(lat), statistics.median(thr))
    base_lat, base_thr = res["(a) inspiration: no cache, eager"]
    print(f"\n{a.config}: {cfg.model.encoder} {cfg.model.encoder_kwargs}, {cfg.model.n_layers}-layer "
          f"{cfg.model.d_model}-d decoder, vocab {tok.vocab_size}, {n_tok} tokens/caption, "
          f"{torch.get_num_threads()} threads")
    print(f"{'path':<34} {'latency b=1 (ms)':>17} {'speed-up':>9} {'img/s b=' + str(a.batch):>11} {'speed-up':>9}")
    for name, (lat, thr) in res.items():
        print(f"{name:<34} {lat * 1e3:>17.1f} {base_lat / lat:>8.2f}x {thr:>11.2f} {thr / base_thr:>8.2f}x")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
