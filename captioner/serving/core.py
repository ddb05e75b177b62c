"""Request-level logic shared by the Triton Python-backend models and the local server:
turning IMAGE bytes into pixel values, and `caption_requests`, the one request path from
decode-loop request tensors (cross K/V, optional BEAM_SIZE / MAX_TOKENS) to CAPTION tensors,
run over the decode loop's in-process onnxruntime decoder (`DecodeLoop.in_process`, what
Triton's decode_loop model and `captioner serve` run) or any decoder runner function.
Every request either succeeds or gets its own error. Imports neither torch nor onnx."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from captioner.core.decoding import CachedStep, DecodeParams, decode
from captioner.core.limits import MAX_BEAM
from captioner.core.names import (BEAM_SIZE, CAPTION, CROSS_KV, DECODE_FILE, DECODER_GRAPH_FILE, MAX_TOKENS,
                                  PREPROCESS_FILE, SELECT_ROWS_FILE, TOKENIZER_FILE)
from captioner.core.preprocess import (ACCEPTED_FORMATS, SERVING_MAX_PIXELS, ImageError, PreprocessConfig,
                                       preprocess_bytes)
from captioner.core.tokenizer import CaptionTokenizer
from captioner.serving.errors import RequestError


def error_code(e: BaseException) -> str:
    """Triton's error code for an exception met while serving a request: bad input (a
    RequestError or any ValueError) is the caller's INVALID_ARG, anything else INTERNAL. The
    Python models pass it as `pb_utils.TritonError(msg, getattr(pb_utils.TritonError, code))`:
    without a code python_backend answers INTERNAL (src/pb_error.h, PbError's default
    TRITONSERVER_ERROR_INTERNAL); captioner.serving.server.dataplane maps the same exceptions the same way."""
    return "INVALID_ARG" if isinstance(e, ValueError) else "INTERNAL"


def image_bytes_to_pixels(images: np.ndarray, pre: PreprocessConfig, max_pixels: int = SERVING_MAX_PIXELS,
                          check: Callable[[int], None] | None = None) -> np.ndarray:
    """images: object array of encoded bytes, shape [B] or [B, 1] -> pixels [B, 3, H, W].
    `max_pixels` lowers the per-image cap of `pre` (serving accepts less than ingest);
    `check(i)` runs before image i is decoded and may raise to abandon the rest (a request
    whose client has gone)."""
    flat = images.reshape(-1)
    if flat.size == 0:
        raise RequestError("IMAGE holds no elements")
    out = []
    for i, item in enumerate(flat):
        if not isinstance(item, (bytes, bytearray, np.bytes_)):
            raise RequestError(f"IMAGE[{i}] must be encoded image bytes, got {type(item).__name__}")
        if check is not None:
            check(i)
        try:
            out.append(preprocess_bytes(bytes(item), pre, name=f"IMAGE[{i}]", max_pixels=max_pixels))
        except ImageError as e:
            raise RequestError(str(e)) from None
    return np.stack(out)


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone (nothing decoded); (0, 0) when unreadable
    (the decoder then names the problem)."""
    from PIL import Image

    try:  # header parsers of the accepted formats only, as preprocess.open_image
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            w, h = img.size
            return int(w), int(h)
    except Exception:  # noqa: BLE001 - any header we cannot read is refused by the decoder
        return 0, 0


def check_pixel_budget(images: np.ndarray, budget: int, max_pixels: int | None = None) -> int:
    """Refuse, before decoding any image, a request with an image over `max_pixels` or whose
    images together exceed `budget` pixels; returns the request's total pixels."""
    total, n = 0, 0
    for i, b in enumerate(images.reshape(-1)):
        w, h = header_size(bytes(b)) if isinstance(b, (bytes, bytearray, np.bytes_)) else (0, 0)
        if max_pixels is not None and w * h > max_pixels:
            raise RequestError(f"IMAGE[{i}]: image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                               f"{max_pixels / 1e6:.1f} megapixels")
        total, n = total + w * h, n + 1
    if total > budget:
        raise RequestError(f"IMAGE: the request's {n} image(s) hold {total / 1e6:.1f} megapixels, over the "
                           f"per-request pixel budget of {budget / 1e6:.1f} megapixels (send fewer or smaller "
                           f"images per request)")
    return total


@dataclass
class DecodeSettings:
    """The decode loop's settings, its version folder's decode.json (written by `captioner
    export`, read by the decode loop wherever it runs): special token ids, the token limit,
    the cache shape, and the beam search scoring options."""
    bos_id: int
    eos_id: int
    max_new_tokens: int
    n_layers: int
    n_heads: int
    head_dim: int
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def save(self, d: str | Path) -> Path:
        """Write d/decode.json (d: a decode_loop version folder); returns the file."""
        path = Path(d) / DECODE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, d: str | Path) -> "DecodeSettings":
        """Read d/decode.json (d: a decode_loop version folder)."""
        return cls(**json.loads((Path(d) / DECODE_FILE).read_text()))


def params_for(beam: int | None, max_tokens: int | None, s: DecodeSettings) -> DecodeParams:
    beam = 1 if beam is None else int(beam)
    if not 1 <= beam <= MAX_BEAM:
        raise RequestError(f"BEAM_SIZE must be between 1 and {MAX_BEAM}, got {beam}")
    mt = s.max_new_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= mt <= s.max_new_tokens:
        raise RequestError(f"MAX_TOKENS must be between 1 and {s.max_new_tokens}, got {mt}")
    return DecodeParams(strategy="beam" if beam > 1 else "greedy", beam_size=beam, max_new_tokens=mt,
                        length_penalty=s.length_penalty, no_repeat_ngram_size=s.no_repeat_ngram_size)


class DecodeLoop:
    """Captions batches of cross-attention K/V with either `make_step(cross_kv) -> StepFn`
    (the in-process bound decoder: the whole loop in one model execution) or a decoder runner
    `run(input_ids [R,1] int64, cross_kv [R,2L,H,P,Dh], past_kv [R,2L,H,T',Dh]) -> (logits, present_kv)`."""

    def __init__(self, tokenizer: CaptionTokenizer, settings: DecodeSettings, run: Callable | None = None,
                 make_step: Callable | None = None):
        self.tok, self.s, self.run, self.make_step = tokenizer, settings, run, make_step
        self.patches: int | None = None  # P the decoder graph takes, when known
        self.kv_dtype = np.dtype(np.float32)  # what the step graph keeps the cross K/V and cache in

    @classmethod
    def from_dir(cls, d: str | Path, run: Callable | None = None, make_step: Callable | None = None) -> "DecodeLoop":
        return cls(CaptionTokenizer.from_file(Path(d) / TOKENIZER_FILE), DecodeSettings.load(d), run, make_step)

    @classmethod
    def in_process(cls, d: str | Path, threads: int = 0, device_id: int = 0) -> "DecodeLoop":
        """The decode loop of a decode_loop version folder, over the decoder graph shipped in
        that folder (decoder.onnx, select_rows.onnx), in this process."""
        from captioner.serving.onnx_runtime import BoundDecoder

        d = Path(d)
        for f in (DECODER_GRAPH_FILE, SELECT_ROWS_FILE):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / f} not found: the decode loop runs the decoder graph shipped in its own "
                                        f"version folder (re-export the repository with this `captioner export`)")
        bound = BoundDecoder(d / DECODER_GRAPH_FILE, d / SELECT_ROWS_FILE, threads, device_id)
        loop = cls.from_dir(d, make_step=bound.step)
        loop.patches, loop.kv_dtype = bound.patches, bound.dtype
        return loop

    def check_cross_kv(self, cross: np.ndarray, name: str = "cross_kv") -> None:
        s = self.s
        want = (2 * s.n_layers, s.n_heads, self.patches, s.head_dim)
        if cross.ndim != 5 or any(w is not None and g != w for g, w in zip(cross.shape[1:], want)):
            raise RequestError(f"{name} must have shape [B, {want[0]}, {want[1]}, {want[2] or 'P'}, {want[3]}], "
                               f"got {list(cross.shape)}")
        if cross.dtype != np.float32:
            raise RequestError(f"{name} must be FP32, got {cross.dtype}")

    def caption(self, cross: np.ndarray, params: DecodeParams) -> list[str]:
        """cross [B,2L,H,P,Dh] -> B captions (rows may finish at different steps)."""
        B = cross.shape[0]
        s = self.s
        if self.make_step is not None:
            step = self.make_step(cross)
        else:
            step = CachedStep(self.run, cross, np.zeros((B, 2 * s.n_layers, s.n_heads, 0, s.head_dim), np.float32))
        ids = decode(step, B, self.tok.bos_id, self.tok.eos_id, params)
        return [self.tok.decode(x) for x in ids]

    def caption_groups(self, items: list[tuple[np.ndarray, DecodeParams]]) -> list[list[str] | Exception]:
        """Batch many requests: requests with the same decoding parameters and patch count
        are decoded together; results come back in request order."""
        groups: dict[tuple, list[int]] = {}
        for i, (cross, p) in enumerate(items):
            groups.setdefault((p.strategy, p.beam_size, p.max_new_tokens, cross.shape[3]), []).append(i)
        out: list = [None] * len(items)
        for idx in groups.values():
            try:
                caps = self.caption(np.concatenate([items[i][0] for i in idx]), items[idx[0]][1])
            except Exception as e:  # noqa: BLE001 - one failing group must not sink the others
                for i in idx:
                    out[i] = e
                continue
            k = 0
            for i in idx:
                n = items[i][0].shape[0]
                out[i] = caps[k:k + n]
                k += n
        return out


def request_int(tensors: dict, name: str) -> int | None:
    """One optional INT32 parameter of a request: absent/empty -> None; every row of the
    request must carry the same value (a request is decoded with one setting)."""
    a = tensors.get(name)
    if a is None or a.size == 0:
        return None
    vals = set(np.asarray(a).reshape(-1).tolist())
    if len(vals) > 1:
        raise RequestError(f"{name} must be the same for every image of a request, got {sorted(vals)}")
    return int(vals.pop())


def captions_tensor(caps: list[str]) -> np.ndarray:
    return np.array([c.encode() for c in caps], dtype=np.object_).reshape(-1, 1)


def caption_requests(loop: DecodeLoop, requests: list[dict]) -> list[dict | Exception]:
    """The request-level step of the decode loop, for `captioner serve` and Triton's
    decode_loop model alike: each request's tensors {cross_kv, BEAM_SIZE?, MAX_TOKENS?} ->
    {CAPTION: [B,1] bytes} or that request's own error. Checks the cross K/V, parses the
    parameters, decodes requests with equal settings in one batch, encodes the captions."""
    out: list = [None] * len(requests)
    ok, items = [], []
    for i, t in enumerate(requests):
        try:
            cross = t.get(CROSS_KV)
            if cross is None:
                raise RequestError(f"missing input {CROSS_KV}")
            loop.check_cross_kv(cross)
            items.append((cross, params_for(request_int(t, BEAM_SIZE), request_int(t, MAX_TOKENS), loop.s)))
            ok.append(i)
        except Exception as e:  # noqa: BLE001 - this request's error only
            out[i] = e
    for i, r in zip(ok, loop.caption_groups(items)):
        out[i] = r if isinstance(r, Exception) else {CAPTION: captions_tensor(r)}
    return out


def load_preprocess(d: str | Path) -> PreprocessConfig:
    return PreprocessConfig.from_dict(json.loads((Path(d) / PREPROCESS_FILE).read_text()))
