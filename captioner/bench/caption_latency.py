"""Caption latency (batch 1) and throughput (batch 8), side by side in one run, on the
`seed-vit768` shape with random weights and 20-token captions:

  (a) the inspiration's algorithm: greedy, PyTorch eager, the whole decoder (cross-attention
      K/V included) recomputed over the padded sequence at every step, no cache
  (b) our PyTorch path: K/V cross-attention computed once per image, self-attention KV cache
  (c) our served onnxruntime path: the exported encoder, then decode_loop's in-process
      step graph (captioner.serving.onnx_runtime.BoundDecoder: I/O binding, cache kept in place)
  (d) the same, onnxruntime dynamic int8 (per-channel weights)
  (d') the same, the step graph 4-bit weight-only (MatMulNBits, block 32), the encoder int8
  (c') part: the traced `decoder` model (stacked past_kv, concatenated per step) driven
      through a host round trip per step, for comparison
  (e) peer: Hugging Face `VisionEncoderDecoderModel.generate` (ViT encoder + BERT decoder with
      cross-attention, KV cache) at the same sizes, random weights, configs built locally
      (nothing downloaded; needs the `bench` extra: transformers)

    python -m captioner.bench.caption_latency [--config seed-vit768] [--runs 5] [--json]

EOS is disabled so every path generates exactly the same number of tokens (random weights).
Prints ratios against (a) and against the HF peer (e). Times include the image encoder.

Roofline of each served path (c, d, d'), batch 1: a decoder step reads every weight of the step
graph once (bytes counted in the graph: captioner.export.graphs.step_weight_bytes) plus the cross
K/V of the image and the cache so far (state bytes, at the caption's middle position). This
machine's copy bandwidth is measured in the same run (a 256 MB numpy copy, read + write bytes
over the best time, one thread); the floor of a step is (weight + state bytes) / bandwidth, of a
caption the encoder's measured time + tokens x the step floor. `of floor` = floor / measured
(1.0 = at the memory floor), `step / floor` = measured step / step floor.
`--json` prints one JSON object with every row in ms (and images/s at the batch size) and a
`roofline` object per served path.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.core.config import load_config
from captioner.core.decoding import CachedStep, greedy
from captioner.core.deployment import DECODER_SPIN_ENV
from captioner.core.names import DECODE_LOOP, DECODER_GRAPH_FILE
from captioner.core.tokenizer import CaptionTokenizer
from captioner.export.exporter import export
from captioner.export.graphs import step_weight_bytes
from captioner.modeling.checkpoint import atomic_save
from captioner.modeling.encoders import resolve_preprocess
from captioner.modeling.inference import torch_step
from captioner.modeling.model import Captioner
from captioner.serving.core import DecodeLoop
from captioner.serving.onnx_runtime import OrtCaptioner, decoder_spin

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


def copy_bandwidth(mb: int = 256, runs: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write), best of `runs`, one thread."""
    src = np.ones(mb * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def step_state_bytes(loop, n_tok: int) -> int:
    """Bytes of per-caption state one step reads at batch 1: the cross K/V of every layer and
    the self-attention cache at the caption's middle position."""
    s = loop.s
    per_position = 2 * s.n_layers * s.n_heads * s.head_dim * loop.kv_dtype.itemsize
    return per_position * ((loop.patches or 0) + n_tok // 2)


def roofline(enc_fn, decode_fn, x1, graph: Path, loop, n_tok: int, bandwidth: float, runs: int) -> dict:
    """Encoder and decode-loop times of one served path at batch 1, and its memory floor."""
    enc_fn(x1)
    enc = statistics.median(_timed(lambda: enc_fn(x1), runs))
    cross = enc_fn(x1)
    decode_fn(cross)
    dec = statistics.median(_timed(lambda: decode_fn(cross), runs))
    wb, sb = step_weight_bytes(graph), step_state_bytes(loop, n_tok)
    floor_step = (wb + sb) / bandwidth
    return {"step_weight_bytes": wb, "step_state_bytes": sb, "encoder_ms": enc * 1e3, "step_ms": dec / n_tok * 1e3,
            "floor_step_ms": floor_step * 1e3, "floor_caption_ms": (enc + n_tok * floor_step) * 1e3,
            "step_vs_floor": dec / n_tok / floor_step}


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def cpu_flags() -> list[str]:
    """The CPU's vector extensions the ratios depend on (from /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return [f for f in want if f in flags]


def random_model(config: str, vocab: int):
    """A captioner of a preset's shape with random weights and a `vocab`-word tokenizer."""
    cfg = load_config(config)
    words = [f"w{i}" for i in range(vocab - 4)]
    tok = CaptionTokenizer.train([" ".join(words)], "wordlevel", vocab_size=vocab)
    cfg.model.vocab_size, cfg.model.pretrained = tok.vocab_size, False
    model = Captioner(cfg.model).eval()
    return cfg, model, tok, resolve_preprocess(model.encoder.backbone)


def save_random(work: Path, cfg, model, tok, pre) -> Path:
    ck = work / "ckpt.pt"
    atomic_save({"config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_str(),
                 "preprocess": pre.to_dict(), "step": 0}, ck)
    return ck


def hf_peer(cfg, vocab: int, image_size: int):
    """HF VisionEncoderDecoderModel with the same encoder/decoder sizes (random weights)."""
    from transformers import BertConfig, BertLMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    m, enc_kw = cfg.model, dict(cfg.model.encoder_kwargs)
    ecfg = ViTConfig(hidden_size=int(enc_kw.get("embed_dim", 768)), num_hidden_layers=int(enc_kw.get("depth", 12)),
                     num_attention_heads=int(enc_kw.get("num_heads", 12)),
                     intermediate_size=4 * int(enc_kw.get("embed_dim", 768)), image_size=image_size,
                     patch_size=int(enc_kw.get("patch_size", 16)))
    dcfg = BertConfig(vocab_size=vocab, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                      num_attention_heads=m.n_heads, intermediate_size=int(m.d_model * m.mlp_ratio),
                      max_position_embeddings=max(64, m.max_len), is_decoder=True, add_cross_attention=True)
    model = VisionEncoderDecoderModel(encoder=ViTModel(ecfg, add_pooling_layer=False),
                                      decoder=BertLMHeadModel(dcfg)).eval()
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-vit768")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", default=None, help="keep the exported repository here")
    ap.add_argument("--json", action="store_true", help="print one JSON object with every row in ms")
    ap.add_argument("--no-hf", action="store_true", help="leave out the HF generate peer (no transformers)")
    ap.add_argument("--served-only", action="store_true",
                    help="time only the served onnxruntime paths and their roofline (no peers, no ratios to them)")
    ap.add_argument("--decoder-spin", action="store_true",
                    help=f"the step graph's threads spin between runs ({DECODER_SPIN_ENV}=1): for a decode loop "
                         "with its cores to itself; the default (sleeping) is what a shared server runs")
    a = ap.parse_args(argv)
    if a.decoder_spin:
        os.environ[DECODER_SPIN_ENV] = "1"
    torch.manual_seed(0)
    cfg, model, tok, pre = random_model(a.config, a.vocab)
    n_tok = min(20, cfg.model.max_len - 1)
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-"))
    ck = save_random(work, cfg, model, tok, pre)
    print(f"exporting {a.config} (random weights) to ONNX ...", flush=True)
    kinds = ("fp32", "int8", "int4")
    for k in kinds:
        export(str(ck), str(work / k), device="cpu", verify=False, quantize=None if k == "fp32" else k)
    orts = {k: OrtCaptioner(work / k) for k in kinds}
    loops = {k: DecodeLoop.in_process(work / k / DECODE_LOOP / "1") for k in kinds}
    ort32 = orts["fp32"]

    def ours_torch(x):
        with torch.no_grad():
            _, cross = model.encode_for_decoding(x)
            return greedy(torch_step(model, cross), len(x), tok.bos_id, NO_EOS, n_tok)

    def ours_ort(o, loop):
        def f(x):  # the served path: encoder, then decode_loop's in-process bound decoder
            _, cross = o.run_encoder(x.numpy())
            return greedy(loop.make_step(cross), len(x), tok.bos_id, NO_EOS, n_tok)
        return f

    def bare_ort_steps(o):  # part: the decoder alone through the old per-step host round trip
        def f(x):
            _, cross = o.run_encoder(x.numpy())
            past = np.zeros((len(x), 2 * cfg.model.n_layers, cfg.model.n_heads, 0,
                             cfg.model.d_model // cfg.model.n_heads), np.float32)
            return greedy(CachedStep(o.run_decoder, cross, past), len(x), tok.bos_id, NO_EOS, n_tok)
        return f

    def base(x):
        with torch.no_grad():
            return baseline_caption(model, x, tok.bos_id, n_tok).tolist()

    served = {"fp32": "(c) onnxruntime fp32, served path", "int8": "(d) onnxruntime int8, served path",
              "int4": "(d') onnxruntime int4 step graph (int8 encoder), served path"}
    paths = {"(a) inspiration: no cache, eager": base, "(b) PyTorch + KV cache": ours_torch,
             **{served[k]: ours_ort(orts[k], loops[k]) for k in kinds},
             "(c') fp32, traced decoder, host round trip per step": bare_ort_steps(ort32)}
    if a.served_only:
        paths = {served[k]: paths[served[k]] for k in kinds}
    HF = "(e) peer: HF VisionEncoderDecoder.generate"
    if not a.no_hf and not a.served_only:
        hf = hf_peer(cfg, tok.vocab_size, pre.input_size[1])

        def hf_generate(x):
            with torch.no_grad():
                out = hf.generate(pixel_values=x, max_new_tokens=n_tok, min_new_tokens=n_tok, do_sample=False,
                                  num_beams=1, decoder_start_token_id=tok.bos_id, pad_token_id=0, eos_token_id=None)
            return out[:, 1:].tolist()
        paths[HF] = hf_generate
    x1 = torch.randn(1, *pre.input_size)
    xb = torch.randn(a.batch, *pre.input_size)
    served_same = None
    if not a.served_only:
        ref = base(x1)
        assert ours_torch(x1) == ref, "KV-cache path must produce the baseline's tokens"
        served_same = paths["(c) onnxruntime fp32, served path"](x1) == ref  # random weights: near-ties may flip
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
    bandwidth = copy_bandwidth()
    roof = {}
    for k in kinds:
        def enc(x, o=orts[k]):
            return o.run_encoder(x.numpy())[1]

        def dec(cross, loop=loops[k]):
            return greedy(loop.make_step(cross), 1, tok.bos_id, NO_EOS, n_tok)
        r = roofline(enc, dec, x1, work / k / DECODE_LOOP / "1" / DECODER_GRAPH_FILE, loops[k], n_tok, bandwidth,
                     a.runs)
        r["weights"], r["caption_ms"] = k, res[served[k]][0] * 1e3
        r["fraction_of_floor"] = r["floor_caption_ms"] / r["caption_ms"]
        roof[served[k]] = r
    base_lat, base_thr = res.get("(a) inspiration: no cache, eager", (None, None))
    hf_lat = res[HF][0] if HF in res else None
    flags = cpu_flags()
    if a.json:
        print(json.dumps({"config": a.config, "tokens": n_tok, "vocab": tok.vocab_size, "batch": a.batch,
                          "threads": torch.get_num_threads(), "device": "cpu", "cpu_flags": flags,
                          "decoder_spin": decoder_spin(),
                          "copy_bandwidth_gb_s": bandwidth / 1e9,
                          "served_tokens_equal_pytorch": served_same,
                          "rows": {n: {"latency_b1_ms": lat * 1e3, f"images_per_s_b{a.batch}": thr,
                                       "vs_inspiration": base_lat / lat if base_lat else None,
                                       "vs_hf_generate": hf_lat / lat if hf_lat else None,
                                       **({"roofline": roof[n]} if n in roof else {})}
                                   for n, (lat, thr) in res.items()}}))
    else:
        print(f"\n{a.config}: {cfg.model.encoder} {cfg.model.encoder_kwargs}, {cfg.model.n_layers}-layer "
              f"{cfg.model.d_model}-d decoder, vocab {tok.vocab_size}, {n_tok} tokens/caption, "
              f"{torch.get_num_threads()} threads, CPU ({', '.join(flags) or 'flags unknown'})")
        print(f"| path | latency b=1 (ms) | vs (a) | vs (e) HF | img/s b={a.batch} | vs (a) |\n|---|---|---|---|---|---|")
        for name, (lat, thr) in res.items():
            vs_hf = f"{hf_lat / lat:.2f}x" if hf_lat else "-"
            vs_a, thr_a = (f"{base_lat / lat:.2f}x", f"{thr / base_thr:.2f}x") if base_lat else ("-", "-")
            print(f"| {name} | {lat * 1e3:.1f} | {vs_a} | {vs_hf} | {thr:.2f} | {thr_a} |")
        print(f"\nroofline, batch 1 (copy bandwidth {bandwidth / 1e9:.1f} GB/s, numpy, measured in this run)")
        print("| path | weights/step (MB) | state/step (MB) | step (ms) | floor/step (ms) | step / floor "
              "| encoder (ms) | floor/caption (ms) | caption (ms) | of floor |\n" + "|---" * 10 + "|")
        for name, r in roof.items():
            print(f"| {name} | {r['step_weight_bytes'] / 1e6:.1f} | {r['step_state_bytes'] / 1e6:.1f} | "
                  f"{r['step_ms']:.2f} | {r['floor_step_ms']:.2f} | {r['step_vs_floor']:.2f}x | "
                  f"{r['encoder_ms']:.1f} | {r['floor_caption_ms']:.1f} | {r['caption_ms']:.1f} | "
                  f"{r['fraction_of_floor']:.2f} |")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
