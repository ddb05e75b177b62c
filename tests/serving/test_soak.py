"""Soak: mixed good and hostile requests at concurrency 16 against `captioner serve`.

For CAPTIONER_SOAK_S seconds (default 60) sixteen clients send, at random, good requests (one or two
held-out images, and a 15-megapixel image), and hostile ones: pixel and canvas bombs, a request over
the pixel budget, malformed BYTES tensors, wrong shapes and datatypes, an oversized message, and
heavy requests whose client gives up after 50 ms. Every good request must get the caption PyTorch
gives, every hostile one its refusal, the server's peak RSS (VmHWM) must stay under PEAK_RSS_MIB,
and its log must hold no traceback.
"""
import io
import os
import random
import re
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from captioner.core import names
from captioner.data.samples import sample_images
from captioner.modeling.checkpoint import load_checkpoint
from captioner.modeling.inference import caption_tensor
from captioner.serving.core import image_bytes_to_pixels
from tests.helpers import start_serve

SOAK_S = float(os.environ.get("CAPTIONER_SOAK_S", "60"))
CONCURRENCY = 16
# Startup ~790 MiB (onnxruntime, torch imported by the CLI), + the heavy decode lane (~150 MiB),
# + the light lanes, + received messages in flight (at most 16 here, each under 17 MiB).
PEAK_RSS_MIB = 1400


def _png(size, mode="RGB", color=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _gif_canvas_bomb(side=7000) -> bytes:
    """A GIF whose logical screen is side x side while holding one 1x1 frame."""
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, "GIF")
    b = bytearray(buf.getvalue())
    struct.pack_into("<HH", b, 6, side, side)  # logical screen width/height
    return bytes(b)


def _bytes_tensor(items):
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _image(images):
    return [(names.IMAGE, "BYTES", [len(images), 1], _bytes_tensor(images))]


class Soak:
    def __init__(self, url, good, heavy, heavy_caption):
        self.url, self.good, self.heavy, self.heavy_caption = url, good, heavy, heavy_caption
        self.channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 64 << 20),
                                                           ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.bombs = [_png((10000, 10000), "1"), _png((1, 20_000_000), "1"), _gif_canvas_bomb()]
        # kind -> (weight, build() -> (tensors, timeout, expected caption list or status code name))
        self.kinds = {
            "good": (8, self.k_good), "good-pair": (3, self.k_good_pair), "good-heavy": (1, self.k_good_heavy),
            "bomb": (2, self.k_bomb), "over-budget": (1, self.k_over_budget), "bad-prefix": (1, self.k_bad_prefix),
            "too-many-elements": (1, self.k_too_many), "bad-shape": (1, self.k_bad_shape),
            "bad-dtype": (1, self.k_bad_dtype), "oversized": (1, self.k_oversized), "deadline": (1, self.k_deadline),
        }

    # -- request kinds
    def k_good(self, rng):
        img, cap = rng.choice(self.good)
        return _image([img]), 120, [cap]

    def k_good_pair(self, rng):
        (a, ca), (b, cb) = rng.sample(self.good, 2)
        return _image([a, b]), 120, [ca, cb]

    def k_good_heavy(self, rng):
        return _image([self.heavy]), 120, [self.heavy_caption]

    def k_bomb(self, rng):
        return _image([rng.choice(self.bombs)]), 60, "INVALID_ARGUMENT"

    def k_over_budget(self, rng):
        return _image([self.heavy] * 3), 60, "INVALID_ARGUMENT"

    def k_bad_prefix(self, rng):
        raw = struct.pack("<I", rng.randint(100, 10**9)) + b"x" * rng.randint(0, 50)
        return [(names.IMAGE, "BYTES", [1, 1], raw)], 60, "INVALID_ARGUMENT"

    def k_too_many(self, rng):
        return [(names.IMAGE, "BYTES", [1, 1], b"\0\0\0\0" * rng.randint(2, 500_000))], 60, "INVALID_ARGUMENT"

    def k_bad_shape(self, rng):
        img = rng.choice(self.good)[0]
        return [(names.IMAGE, "BYTES", [1, 2], _bytes_tensor([img, img]))], 60, "INVALID_ARGUMENT"

    def k_bad_dtype(self, rng):
        return [(names.IMAGE, "FP32", [1, 1], np.zeros(1, np.float32).tobytes())], 60, "INVALID_ARGUMENT"

    def k_oversized(self, rng):
        return _image([b"\0" * (20 << 20)]), 60, "RESOURCE_EXHAUSTED"

    def k_deadline(self, rng):
        return _image([self.heavy, self.heavy]), 0.05, "DEADLINE_EXCEEDED"

    def call(self, tensors, timeout):
        req = service_pb2.ModelInferRequest(model_name=names.ENSEMBLE)
        for name, dt, shape, raw in tensors:
            req.inputs.add(name=name, datatype=dt, shape=shape)
            req.raw_input_contents.append(raw)
        resp = self.stub.ModelInfer(req, timeout=timeout)
        raw = resp.raw_output_contents[0]
        out, off = [], 0
        while off < len(raw):
            (k,) = struct.unpack_from("<I", raw, off)
            out.append(raw[off + 4:off + 4 + k].decode())
            off += 4 + k
        return out

    def worker(self, seed: int, end: float) -> list[tuple[str, str]]:
        """Requests until `end` (bounded: at most 10,000); returns (kind, problem) for each failure."""
        rng = random.Random(seed)
        kinds, weights = zip(*[(k, w) for k, (w, _) in self.kinds.items()])
        problems, counts = [], Counter()
        for _ in range(10_000):
            if time.monotonic() >= end:
                break
            kind = rng.choices(kinds, weights)[0]
            tensors, timeout, want = self.kinds[kind][1](rng)
            counts[kind] += 1
            try:
                got = self.call(tensors, timeout)
                if got != want:
                    problems.append((kind, f"answered {got!r}, want {want!r}"))
            except grpc.RpcError as e:
                if e.code().name != want:
                    problems.append((kind, f"{e.code().name}: {e.details()} (want {want})"))
        return problems, counts


def _hwm_mib(pid) -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{pid}/status").read()).group(1)) / 1024


@pytest.mark.slow  # CAPTIONER_SOAK_S seconds (60) of load; `make test` runs it (no marker filter)
@pytest.mark.skipif(SOAK_S <= 0, reason="CAPTIONER_SOAK_S=0")
def test_soak_mixed_good_and_hostile_requests(exported_repo, trained_run, tmp_path):
    ck = load_checkpoint(trained_run.out_dir)
    imgs = [b for _, b in sample_images(ck.config.data, 8)]
    heavy = _png((3900, 3900), "RGB", (40, 120, 200))
    with torch.no_grad():
        caps = caption_tensor(ck.model, ck.tokenizer, torch.from_numpy(
            image_bytes_to_pixels(np.array(imgs + [heavy], dtype=object), ck.preprocess)))
    good, heavy_caption = list(zip(imgs, caps[:-1])), caps[-1]

    log = tmp_path / "serve.log"
    p, url = start_serve(exported_repo[0], log)
    try:
        soak = Soak(url, good, heavy, heavy_caption)
        end = time.monotonic() + SOAK_S
        with ThreadPoolExecutor(CONCURRENCY) as ex:
            results = list(ex.map(lambda s: soak.worker(s, end), range(CONCURRENCY)))
        problems = [x for r, _ in results for x in r]
        counts = sum((c for _, c in results), Counter())
        peak = _hwm_mib(p.pid)
        print(f"soak {SOAK_S:.0f} s at concurrency {CONCURRENCY}: {sum(counts.values())} requests "
              f"{dict(counts)}, server peak RSS {peak:.0f} MiB")
        assert p.poll() is None, "the server died"
        assert not problems, f"{len(problems)} wrong answers, e.g. {problems[:5]}"
        assert counts["good"] > 0 and sum(v for k, v in counts.items() if not k.startswith("good")) > 0
        assert peak < PEAK_RSS_MIB, f"server peak RSS {peak:.0f} MiB over the bound of {PEAK_RSS_MIB} MiB"
        soak.channel.close()
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
    finally:
        p.kill()
        p.wait()
