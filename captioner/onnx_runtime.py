"""onnxruntime runners over an exported Triton repository (encoder + decoder ONNX)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner.decoding import DecodeParams
from captioner.names import (CROSS_KV, DECODE_LOOP, DECODER, ENCODER, ENCODER_HIDDEN, INPUT_IDS, LOGITS, PAST_KV,
                             PIXEL_VALUES, PREPROCESS, PRESENT_KV)
from captioner.serving_core import DecodeLoop, load_preprocess


def session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), so, providers=providers)


class OrtCaptioner:
    def __init__(self, repo: str | Path, threads: int = 0):
        repo = Path(repo)
        self.repo = repo
        self.encoder = session(repo / ENCODER / "1" / "model.onnx", threads)
        self.decoder = session(repo / DECODER / "1" / "model.onnx", threads)
        self.pre = load_preprocess(repo / PREPROCESS / "1")
        self.loop = DecodeLoop.from_dir(repo / DECODE_LOOP / "1", self.run_decoder)

    def run_encoder(self, pixels: np.ndarray):
        hidden, cross = self.encoder.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: pixels.astype(np.float32)})
        return hidden, cross

    def run_decoder(self, input_ids, cross_kv, past_kv):
        logits, present = self.decoder.run([LOGITS, PRESENT_KV], {INPUT_IDS: input_ids.astype(np.int64),
                                                                   CROSS_KV: cross_kv, PAST_KV: past_kv})
        return logits, present

    def caption_pixels(self, pixels: np.ndarray, params: DecodeParams | None = None) -> list[str]:
        params = params or DecodeParams(max_new_tokens=self.loop.s.max_new_tokens)
        _, cross = self.run_encoder(pixels)
        return self.loop.caption(cross, params)
