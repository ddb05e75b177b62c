"""The two ONNX sessions of an exported repository (encoder and decoder) in onnxruntime.
No decode loop here: that is `captioner.serving_core`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner.names import (CROSS_KV, DECODER, ENCODER, ENCODER_HIDDEN, INPUT_IDS, LOGITS, PAST_KV, PIXEL_VALUES,
                             PRESENT_KV)


def session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), so, providers=providers)


class OrtCaptioner:
    """encoder/<version>/model.onnx and decoder/<version>/model.onnx as onnxruntime sessions."""

    def __init__(self, repo: str | Path, threads: int = 0, encoder_version: int = 1, decoder_version: int = 1):
        repo = Path(repo)
        self.repo = repo
        self.encoder = session(repo / ENCODER / str(encoder_version) / "model.onnx", threads)
        self.decoder = session(repo / DECODER / str(decoder_version) / "model.onnx", threads)

    def run_encoder(self, pixels: np.ndarray):
        hidden, cross = self.encoder.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: pixels.astype(np.float32)})
        return hidden, cross

    def run_decoder(self, input_ids, cross_kv, past_kv):
        logits, present = self.decoder.run([LOGITS, PRESENT_KV], {INPUT_IDS: input_ids.astype(np.int64),
                                                                   CROSS_KV: cross_kv, PAST_KV: past_kv})
        return logits, present
