"""The parity check of an exported repository: onnxruntime (the encoder, the traced decoder and
the decode loop's step graph, as served) against PyTorch on held-out images, failing loudly."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from captioner.core.decoding import DecodeParams
from captioner.core.names import DECODE_LOOP
from captioner.data.samples import sample_images
from captioner.export.report import ParityReport
from captioner.modeling.checkpoint import LoadedCheckpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving.core import DecodeLoop, image_bytes_to_pixels

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    pass


# An fp16 step graph's log-probs may differ from PyTorch's fp32 by fp16 rounding (~1e-3 relative
# per op); beyond this the graph is wrong, not rounded.
FP16_LOGPROB_ATOL = 0.1


def check_parity(ck: LoadedCheckpoint, repo: Path, n_images: int = 8, atol: float = 1e-3,
                 fail: bool = True) -> ParityReport:
    from captioner.serving.onnx_runtime import OrtCaptioner

    imgs = sample_images(ck.config.data, n_images)
    pixels = image_bytes_to_pixels(np.array([b for _, b in imgs], dtype=object), ck.preprocess)
    ort_m = OrtCaptioner(repo)
    m = ck.model.eval()
    rep = ParityReport(images=len(imgs))
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        mem_t, cross_t = m.encode_for_decoding(x)
    mem_o, cross_o = ort_m.run_encoder(pixels)
    rep.encoder_max_abs_diff = float(max(np.abs(mem_o - mem_t.numpy()).max(), np.abs(cross_o - cross_t.numpy()).max()))
    params = DecodeParams(max_new_tokens=m.cfg.max_new_tokens)
    caps_t = caption_tensor(m, ck.tokenizer, x, DecodeParams(**vars(params)))
    loop = DecodeLoop.in_process(repo / DECODE_LOOP / "1")  # the served path: in-process bound decoder
    caps_o = loop.caption(cross_o, DecodeParams(**vars(params)))
    # per-step logits, teacher-forced on PyTorch's captions, through the cache in both
    ids = [[ck.tokenizer.bos_id] + ck.tokenizer.encode(c, m.cfg.max_len)[1:-1] for c in caps_t]
    T = min(len(s) for s in ids)
    tok = np.array([s[:T] for s in ids], dtype=np.int64)
    past_o = np.zeros((len(imgs), 2 * m.cfg.n_layers, m.cfg.n_heads, 0, m.cfg.d_model // m.cfg.n_heads), np.float32)
    past_t, worst = None, 0.0
    for t in range(T):
        lo, past_o = ort_m.run_decoder(tok[:, t:t + 1], cross_o, past_o)
        with torch.no_grad():
            lt, past_t = m.decode_step(torch.from_numpy(tok[:, t:t + 1]), cross_t, past_t)
        worst = max(worst, float(np.abs(lo - lt.numpy()).max()))
    rep.logits_max_abs_diff = worst
    rep.loop_logprobs_max_abs_diff = _loop_logprobs_diff(loop, cross_o, tok, m, cross_t)
    rep.captions_equal = sum(a == b for a, b in zip(caps_t, caps_o))
    rep.mismatches = [{"image": n, "pytorch": a, "onnxruntime": b} for (n, _), a, b in zip(imgs, caps_t, caps_o) if a != b]
    log.info("parity on %d images: encoder max|diff| %.2e, logits max|diff| %.2e (decode loop's step graph: "
             "log-probs %.2e), greedy captions equal %d/%d", rep.images, rep.encoder_max_abs_diff,
             rep.logits_max_abs_diff, rep.loop_logprobs_max_abs_diff, rep.captions_equal, rep.images)
    fp16 = loop.kv_dtype == np.float16  # an fp16 step graph: log-probs within fp16's error, and a
    loop_atol = FP16_LOGPROB_ATOL if fp16 else atol * 10  # near-tie may flip a word (reported, not fatal)
    rep.tolerances = {"encoder_max_abs_diff": atol, "logits_max_abs_diff": atol * 10,
                      "loop_logprobs_max_abs_diff": loop_atol, "captions_must_match": not fp16}
    rep.passed = not (rep.encoder_max_abs_diff > atol or rep.logits_max_abs_diff > atol * 10
                      or rep.loop_logprobs_max_abs_diff > loop_atol or bool(rep.mismatches and not fp16))
    if fail and not rep.passed:
        raise ParityError(f"onnxruntime disagrees with PyTorch: {json.dumps(asdict(rep), indent=1)}")
    return rep


def _loop_logprobs_diff(loop, cross_o: np.ndarray, tok: np.ndarray, m, cross_t) -> float:
    """Largest |log-prob difference| between the decode loop's step graph (fed onnxruntime's
    cross K/V, as served) and PyTorch, teacher-forced on the same tokens."""
    from captioner.core.decoding import log_softmax

    step, past, worst = loop.make_step(cross_o), None, 0.0
    for t in range(tok.shape[1]):
        lo = step(tok[:, t])
        with torch.no_grad():
            lt, past = m.decode_step(torch.from_numpy(tok[:, t:t + 1]), cross_t, past)
        worst = max(worst, float(np.abs(lo - log_softmax(lt[:, -1].numpy())).max()))
    return worst


