"""Caption latency (batch 1) and throughput (batch 8), side by side in one run, on the
`seed-vit768` shape with random weights and 20-token captions:

  (a) the inspiration's algorithm: greedy, PyTorch eager, the whole decoder (cross-attention
      K/V included) recomputed over the padded sequence at every step, no cache
  (b) our PyTorch path: K/V cross-attention computed once per image, self-attention KV cache
  (c) our served onnxruntime path: the exported encoder, then decode_loop's in-process
      step graph (captioner.onnx_runtime.BoundDecoder: I/O binding, cache kept in place)
  (d) the same, onnxruntime dynamic int8 (per-channel weights)
  (c') part: the traced `decoder` model (stacked past_kv, concatenated per step) driven
      through a host round trip per step, for comparison
  (e) peer: Hugging Face `VisionEncoderDecoderModel.generate` (ViT encoder + BERT decoder with
      cross-attention, KV cache) at the same sizes, random weights, configs built locally
      (nothing downloaded; needs the `bench` extra: transformers)

    python -m benchmarks.caption_latency [--config seed-vit768] [--runs 5] [--json]

EOS is disabled so every path generates exactly the same number of tokens (random weights).
Prints ratios against (a) and against the HF peer (e). Times include the image encoder.
`--json` prints one JSON object with every row in ms (and images/s at the batch size).
"""
from __future__ import annotations

import argparse
import json
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
from captioner.names import DECODE_LOOP
from captioner.onnx_runtime import OrtCaptioner
from captioner.preprocess import PreprocessConfig
from captioner.serving_core import DecodeLoop
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


def random_model(config: str, vocab: int):
    """A captioner of a preset's shape with random weights and a `vocab`-word tokenizer."""
    cfg = load_config(config)
    words = [f"w{i}" for i in range(vocab - 4)]
    tok = CaptionTokenizer.train([" ".join(words)], "wordlevel", vocab_size=vocab)
    cfg.model.vocab_size, cfg.model.pretrained = tok.vocab_size, False
    model = Captioner(cfg.model).eval()
    return cfg, model, tok, PreprocessConfig.from_model(model.encoder.backbone)


def save_random(work: Path, cfg, model, tok, pre) -> Path:
    ck = work / "ckpt.pt"
    atomic_save({"config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_str(),
                 "preprocess": pre.to_dict(), "step": 0}, ck)
    return ck


def hf_peer(cfg, vocab: int, image_size: int):
    """HF VisionEncoderDecoderModel with the same encoder/decoder sizes (random weights)."""
    from transformers import BertConfig, BertLMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel

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
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg, model, tok, pre = random_model(a.config, a.vocab)
    n_tok = min(20, cfg.model.max_len - 1)
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-"))
    ck = save_random(work, cfg, model, tok, pre)
    print(f"exporting {a.config} (random weights) to ONNX ...", flush=True)
    export(str(ck), str(work / "fp32"), device="cpu", verify=False)
    export(str(ck), str(work / "int8"), device="cpu", verify=False, quantize="int8")
    ort32, ort8 = OrtCaptioner(work / "fp32"), OrtCaptioner(work / "int8")
    loop32, loop8 = (DecodeLoop.in_process(work / k / DECODE_LOOP / "1") for k in ("fp32", "int8"))

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

    paths = {"(a) inspiration: no cache, eager": base, "(b) PyTorch + KV cache": ours_torch,
             "(c) onnxruntime fp32, served path": ours_ort(ort32, loop32),
             "(d) onnxruntime int8, served path": ours_ort(ort8, loop8),
             "(c') fp32, traced decoder, host round trip per step": bare_ort_steps(ort32)}
    HF = "(e) peer: HF VisionEncoderDecoder.generate"
    if not a.no_hf:
        hf = hf_peer(cfg, tok.vocab_size, pre.input_size[1])

        def hf_generate(x):
            with torch.no_grad():
                out = hf.generate(pixel_values=x, max_new_tokens=n_tok, min_new_tokens=n_tok, do_sample=False,
                                  num_beams=1, decoder_start_token_id=tok.bos_id, pad_token_id=0, eos_token_id=None)
            return out[:, 1:].tolist()
        paths[HF] = hf_generate
    x1 = torch.randn(1, *pre.input_size)
    xb = torch.randn(a.batch, *pre.input_size)
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
    base_lat, base_thr = res["(a) inspiration: no cache, eager"]
    hf_lat = res[HF][0] if HF in res else None
    if a.json:
        print(json.dumps({"config": a.config, "tokens": n_tok, "vocab": tok.vocab_size, "batch": a.batch,
                          "threads": torch.get_num_threads(), "device": "cpu",
                          "served_tokens_equal_pytorch": served_same,
                          "rows": {n: {"latency_b1_ms": lat * 1e3, f"images_per_s_b{a.batch}": thr,
                                       "vs_inspiration": base_lat / lat,
                                       "vs_hf_generate": hf_lat / lat if hf_lat else None}
                                   for n, (lat, thr) in res.items()}}))
    else:
        print(f"\n{a.config}: {cfg.model.encoder} {cfg.model.encoder_kwargs}, {cfg.model.n_layers}-layer "
              f"{cfg.model.d_model}-d decoder, vocab {tok.vocab_size}, {n_tok} tokens/caption, "
              f"{torch.get_num_threads()} threads, CPU")
        print(f"| path | latency b=1 (ms) | vs (a) | vs (e) HF | img/s b={a.batch} | vs (a) |\n|---|---|---|---|---|---|")
        for name, (lat, thr) in res.items():
            vs_hf = f"{hf_lat / lat:.2f}x" if hf_lat else "-"
            print(f"| {name} | {lat * 1e3:.1f} | {base_lat / lat:.2f}x | {vs_hf} | {thr:.2f} | {thr / base_thr:.2f}x |")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
