"""The ONNX sessions of an exported repository in onnxruntime: encoder and decoder
(`OrtCaptioner`), and the decode loop's own in-process decoder (`BoundDecoder`).
No decode loop here: that is `captioner.serving.core`. Imports neither torch nor onnx."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from captioner.core.deployment import DECODER_SPIN_ENV
from captioner.core.names import (CROSS_KEY, CROSS_KV, CROSS_VALUE, DECODER, ENCODER, ENCODER_HIDDEN, INPUT_IDS,
                                  KV_CACHE_META, LOGITS, MAX_LEN_META, ONNX_MODEL_FILE, PAST_KEY, PAST_KV, PAST_LENGTH,
                                  PAST_VALUE, PIXEL_VALUES, PRESENT_KEY, PRESENT_KV, PRESENT_VALUE, ROWS, SELECTED,
                                  STATE)


# Whether the decode loop's step graph session spins between runs (session(spin=...)). A step is
# ~80 small kernels, ~20 steps back to back; a sleeping pool pays a wake-up per kernel. Measured
# side by side (2 cores, seed-vit768 shape, batch 1, 2 threads, encoder sleeping; see
# docs/benchmarks.md, "Decoder step vs its floor"): on an idle machine spinning wins, int8 step
# 4.92 -> 3.73 ms, int4 3.53 -> 2.81 ms (caption incl. encoder 145 -> 126 ms, 115 -> 102 ms); with
# the cores oversubscribed (load average 7-8 on 2 cores) it loses badly, int8 14.6 -> 51.4 ms, int4
# 23.6 -> 38.5 ms. A served decode loop shares its cores with the encoder, preprocess and image
# decoding under load, so it sleeps unless DECODER_SPIN_ENV=1 says the decode loop has its cores
# to itself (a Triton instance pinned to its own cores, a latency benchmark).
def decoder_spin() -> bool:
    return os.environ.get(DECODER_SPIN_ENV, "0") == "1"

ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # onnxruntime's NodeArg.type


def session(path: str | Path, threads: int = 0, device_id: int = 0, spin: bool = False):
    """An onnxruntime session. `spin`: the intra-op threads spin between runs instead of
    sleeping; only for the decode loop's step graph (see BoundDecoder)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # Threads sleep between runs instead of spinning: each session has its own intra-op pool, and
    # the encoder's spinning threads took the cores from the decoder's steps (and vice versa).
    # Measured on 2 CPU cores, seed-vit768 shape, batch 1: served fp32 caption 352 -> 278 ms,
    # int8 167 -> 119 ms (captioner/bench/caption_latency.py).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    avail = ort.get_available_providers()
    providers = ([("CUDAExecutionProvider", {"device_id": device_id})] if "CUDAExecutionProvider" in avail else []) \
        + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


class OrtCaptioner:
    """encoder/<version>/model.onnx and decoder/<version>/model.onnx as onnxruntime sessions."""

    def __init__(self, repo: str | Path, threads: int = 0, encoder_version: int = 1, decoder_version: int = 1):
        repo = Path(repo)
        self.repo = repo
        self.encoder = session(repo / ENCODER / str(encoder_version) / ONNX_MODEL_FILE, threads)
        self.decoder = session(repo / DECODER / str(decoder_version) / ONNX_MODEL_FILE, threads)

    def run_encoder(self, pixels: np.ndarray):
        hidden, cross = self.encoder.run([ENCODER_HIDDEN, CROSS_KV], {PIXEL_VALUES: pixels.astype(np.float32)})
        return hidden, cross

    def run_decoder(self, input_ids, cross_kv, past_kv):
        logits, present = self.decoder.run([LOGITS, PRESENT_KV], {INPUT_IDS: input_ids.astype(np.int64),
                                                                   CROSS_KV: cross_kv, PAST_KV: past_kv})
        return logits, present


class BoundDecoder:
    """The generation loop's decoder, in-process: one onnxruntime session over the decode
    loop's step graph (captioner.export.graphs; CUDA EP on a GPU, CPU here) driven through I/O
    binding, so a caption's state stays on the session's device. Per caption the cross K/V is
    copied to the device once, one tensor per layer, and bound once; per step only the token
    ids and the position go in and only the last position's logits come out. The KV cache is
    either one preallocated [R, H, max_len, Dh] buffer per layer bound as both past and present
    (the attention kernel appends in place: nothing of the past is copied per step) or, in a
    graph written for a GPU, handed from one step's present to the next step's past on the
    device. Rows are selected (beam reorder, finished rows dropped) on the device by
    `select_rows.onnx`. Built once (Triton's `initialize`, the local server's runner);
    `step(cross)` per caption."""

    def __init__(self, decoder_path: str | Path, select_path: str | Path, threads: int = 0, device_id: int = 0):
        self.decoder = session(decoder_path, threads, device_id, spin=decoder_spin())
        self.select = session(select_path, threads, device_id)
        self.device = "cuda" if self.decoder.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = device_id if self.device == "cuda" else 0
        meta = self.decoder.get_modelmeta().custom_metadata_map
        if meta.get(KV_CACHE_META) not in ("in_place", "append"):
            raise ValueError(f"{decoder_path} is not a decode-loop step graph (no {KV_CACHE_META} metadata): it was "
                             f"written by an older `captioner export`; re-export the repository")
        self.in_place = meta[KV_CACHE_META] == "in_place"
        self.max_len = int(meta[MAX_LEN_META])
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.layers = sum(1 for n in inputs if n.startswith(CROSS_KEY.format("")))
        cross = inputs[CROSS_KEY.format(0)]
        _, self.heads, p, self.head_dim = cross.shape
        self.dtype = np.dtype(ORT_FLOAT_TYPES[cross.type])  # of the cross K/V and the cache
        self.patches = p if isinstance(p, int) else None

    def step(self, cross_kv: np.ndarray) -> "BoundStep":
        return BoundStep(self, cross_kv)


class BoundStep:
    """A `decoding.StepFn` over a BoundDecoder for one batch of captions."""

    def __init__(self, d: BoundDecoder, cross_kv: np.ndarray):
        import onnxruntime as ort

        self.d, self.pos = d, 0
        dev = (d.device, d.device_id)
        cross_kv = np.asarray(cross_kv, d.dtype)  # an fp16 graph: converted once per caption
        B = cross_kv.shape[0]
        self.cross = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cross_kv[:, j]), *dev)
                      for j in range(2 * d.layers)]
        length = d.max_len if d.in_place else 0  # in place: written by the kernel before it is read
        self.past = [ort.OrtValue.ortvalue_from_shape_and_type([B, d.heads, length, d.head_dim], d.dtype, *dev)
                     for _ in range(2 * d.layers)]
        self._bind()

    def _bind(self) -> None:
        """Bind the cross K/V and the cache (the present too when it stays in place): once per
        caption and after rows are selected, not per step."""
        d = self.d
        b = self.binding = d.decoder.io_binding()
        b.bind_output(LOGITS, "cpu")
        for i in range(d.layers):
            b.bind_ortvalue_input(CROSS_KEY.format(i), self.cross[2 * i])
            b.bind_ortvalue_input(CROSS_VALUE.format(i), self.cross[2 * i + 1])
            self._bind_cache(i)

    def _bind_cache(self, i: int) -> None:
        b, d = self.binding, self.d
        b.bind_ortvalue_input(PAST_KEY.format(i), self.past[2 * i])
        b.bind_ortvalue_input(PAST_VALUE.format(i), self.past[2 * i + 1])
        if d.in_place:
            b.bind_ortvalue_output(PRESENT_KEY.format(i), self.past[2 * i])
            b.bind_ortvalue_output(PRESENT_VALUE.format(i), self.past[2 * i + 1])
        else:
            b.bind_output(PRESENT_KEY.format(i), d.device, d.device_id)
            b.bind_output(PRESENT_VALUE.format(i), d.device, d.device_id)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        from captioner.core.decoding import log_softmax

        d, b = self.d, self.binding
        if self.pos >= d.max_len:
            raise ValueError(f"the decoder has {d.max_len} positions; step {self.pos + 1} is past its end")
        b.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(tokens.reshape(-1, 1), np.int64))
        b.bind_cpu_input(PAST_LENGTH, np.array([self.pos], np.int32))
        d.decoder.run_with_iobinding(b)
        out = b.get_outputs()
        self.pos += 1
        if not d.in_place:  # this step's present is the next step's past, on the device
            self.past = list(out[1:])
            for i in range(d.layers):
                self._bind_cache(i)
        return log_softmax(out[0].numpy()[:, -1, :])

    def _gather(self, value, rows):
        b = self.d.select.io_binding()
        b.bind_ortvalue_input(STATE, value)
        b.bind_cpu_input(ROWS, rows)
        b.bind_output(SELECTED, self.d.device, self.d.device_id)
        self.d.select.run_with_iobinding(b)
        return b.get_outputs()[0]

    def select(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.int64)
        self.cross = [self._gather(v, rows) for v in self.cross]
        self.past = [self._gather(v, rows) for v in self.past]
        self._bind()
