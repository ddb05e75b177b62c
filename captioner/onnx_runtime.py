"""The ONNX sessions of an exported repository in onnxruntime: encoder and decoder
(`OrtCaptioner`), and the decode loop's own in-process decoder (`BoundDecoder`).
No decode loop here: that is `captioner.serving_core`. Imports neither torch nor onnx."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner.names import (CROSS_KV, DECODER, ENCODER, ENCODER_HIDDEN, INPUT_IDS, LOGITS, PAST_KV, PIXEL_VALUES,
                             PRESENT_KV, ROWS, SELECTED, STATE)


def session(path: str | Path, threads: int = 0, device_id: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    avail = ort.get_available_providers()
    providers = ([("CUDAExecutionProvider", {"device_id": device_id})] if "CUDAExecutionProvider" in avail else []) \
        + ["CPUExecutionProvider"]
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


class BoundDecoder:
    """The generation loop's decoder, in-process: one onnxruntime session over the decoder
    graph (CUDA EP on a GPU, CPU here) driven through I/O binding, so a caption's state stays
    on the session's device. Per caption the cross K/V is copied to the device once; per step
    only the token ids go in and only the last position's logits come out; the KV cache is
    handed from one step's output to the next step's input as a device OrtValue, and rows are
    selected (beam reorder, finished rows dropped) on the device by `select_rows.onnx`.
    Built once (Triton's `initialize`, the local server's runner); `step(cross)` per caption."""

    def __init__(self, decoder_path: str | Path, select_path: str | Path, threads: int = 0, device_id: int = 0):
        self.decoder = session(decoder_path, threads, device_id)
        self.select = session(select_path, threads, device_id)
        self.device = "cuda" if self.decoder.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = device_id if self.device == "cuda" else 0
        p = next(i.shape[3] for i in self.decoder.get_inputs() if i.name == CROSS_KV)
        self.patches = p if isinstance(p, int) else None

    def step(self, cross_kv: np.ndarray) -> "BoundStep":
        return BoundStep(self, cross_kv)


class BoundStep:
    """A `decoding.StepFn` over a BoundDecoder for one batch of captions."""

    def __init__(self, d: BoundDecoder, cross_kv: np.ndarray):
        import onnxruntime as ort

        self.d = d
        self.cross = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cross_kv, np.float32), d.device, d.device_id)
        B, L2, H, _, Dh = cross_kv.shape
        self.past = ort.OrtValue.ortvalue_from_shape_and_type([B, L2, H, 0, Dh], np.float32, d.device, d.device_id)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        from captioner.decoding import log_softmax

        b = self.d.decoder.io_binding()
        b.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(tokens.reshape(-1, 1), np.int64))
        b.bind_ortvalue_input(CROSS_KV, self.cross)
        b.bind_ortvalue_input(PAST_KV, self.past)
        b.bind_output(LOGITS, "cpu")
        b.bind_output(PRESENT_KV, self.d.device, self.d.device_id)
        self.d.decoder.run_with_iobinding(b)
        logits, self.past = b.get_outputs()
        return log_softmax(logits.numpy()[:, -1, :])

    def _gather(self, value, rows):
        b = self.d.select.io_binding()
        b.bind_ortvalue_input(STATE, value)
        b.bind_cpu_input(ROWS, rows)
        b.bind_output(SELECTED, self.d.device, self.d.device_id)
        self.d.select.run_with_iobinding(b)
        return b.get_outputs()[0]

    def select(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.int64)
        self.cross = self._gather(self.cross, rows)
        self.past = self._gather(self.past, rows)
