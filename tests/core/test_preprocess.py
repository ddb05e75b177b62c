"""Image decoding and preprocessing (`captioner.core.preprocess`): size guards, canvas and
aspect-ratio bombs, the accepted decoders, EXIF orientation, 16-bit images, transparency.

Hostile inputs: each test performs the attack with probes generated here and checks the
bounded outcome: refused with an error naming the offender, nothing written outside the
target folder, memory bounded (generous margins, never timings)."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from captioner.core.preprocess import ImageError, PreprocessConfig, load_image, preprocess_bytes
from tests.helpers import left_red_right_blue, with_exif

ENV = {**os.environ}


def _png(width: int, height: int) -> bytes:
    """A grey PNG written by hand (zlib of the filtered rows), so a 49-megapixel probe costs ~100 KB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = (b"\0" + b"\x80" * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _gif_canvas(w: int, h: int) -> bytes:
    """A 29-byte GIF whose logical screen is w x h with one 1x1 frame."""
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
            + b"\x02\x02\x44\x01\x00;")


PROBE = r"""
import json, resource, sys
from captioner.core.preprocess import ImageError, PreprocessConfig, preprocess_bytes
data = open(sys.argv[1], "rb").read()
cfg = PreprocessConfig(input_size=(3, 32, 32), max_pixels=int(sys.argv[2]))
preprocess_bytes(b"GIF89a", cfg) if False else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    preprocess_bytes(data, cfg, name="probe")
    out = "accepted"
except ImageError as e:
    out = "refused: " + str(e)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"out": out, "grew_mb": grew}))
"""


def _probe(tmp_path, data: bytes, max_pixels: int) -> dict:
    f = tmp_path / "probe.bin"
    f.write_bytes(data)
    warm = tmp_path / "warm.png"  # decode a small PNG first so imports/allocator warm-up are not counted
    Image.new("RGB", (64, 64)).save(warm)
    script = PROBE.replace('preprocess_bytes(b"GIF89a", cfg) if False else None',
                           f'preprocess_bytes(open({str(warm)!r}, "rb").read(), cfg)')
    r = subprocess.run([sys.executable, "-c", script, str(f), str(max_pixels)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_aspect_ratio_bomb_is_refused_before_decoding(tmp_path):
    data = _png(1, 49_000_000)  # 49 MP: under the 50 MP ingest cap, 1:49,000,000
    assert len(data) < 200_000
    r = _probe(tmp_path, data, 50_000_000)
    assert r["out"].startswith("refused: probe") and "aspect ratio" in r["out"], r
    assert r["grew_mb"] < 64, r  # the full decode took ~2 GiB


def test_canvas_bomb_gif_is_refused_under_the_serving_cap(tmp_path):
    from captioner.core.preprocess import DEFAULT_MAX_PIXELS, SERVING_MAX_PIXELS

    assert SERVING_MAX_PIXELS <= DEFAULT_MAX_PIXELS // 2
    data = _gif_canvas(7000, 7000)
    assert len(data) < 64  # 29 bytes
    r = _probe(tmp_path, data, SERVING_MAX_PIXELS)
    assert r["out"].startswith("refused: probe") and "49.0 megapixels" in r["out"], r
    assert r["grew_mb"] < 32, r
    with pytest.raises(ImageError, match="over the limit of 16.0 megapixels"):
        preprocess_bytes(data, PreprocessConfig(), max_pixels=SERVING_MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "ICO", "SGI", "PPM"])
def test_decoders_are_restricted_to_accepted_formats(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, fmt)
    with pytest.raises(ImageError, match=r"not an accepted image format.*JPEG.*PNG"):
        preprocess_bytes(buf.getvalue(), PreprocessConfig(input_size=(3, 16, 16)), name="probe")


def _unnorm(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    return x * np.asarray(cfg.std, np.float32)[:, None, None] + np.asarray(cfg.mean, np.float32)[:, None, None]


@pytest.mark.parametrize("fmt,size", [("JPEG", (64, 32)), ("PNG", (1200, 600))])  # PNG: reduced before resizing
def test_exif_orientation_is_applied(tmp_path, fmt, size):
    cfg = PreprocessConfig(input_size=(3, 32, 32))
    stored = left_red_right_blue(*size)  # sensor layout; orientation 6 = show rotated 90 degrees clockwise
    shown = stored.transpose(Image.Transpose.ROTATE_270)
    buf = io.BytesIO()
    shown.save(buf, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    want = preprocess_bytes(buf.getvalue(), cfg)
    got = preprocess_bytes(with_exif(stored, 6, fmt=fmt), cfg)
    assert np.abs(_unnorm(got, cfg) - _unnorm(want, cfg)).max() < 0.1
    px = _unnorm(got, cfg)
    assert px[0, 4, 16] > 0.8 and px[2, 28, 16] > 0.8  # red on top, blue at the bottom, as a viewer shows it


def test_16_bit_images_are_scaled_not_clipped():
    cfg = PreprocessConfig(input_size=(3, 16, 16))
    arr = np.full((16, 16), 32768, np.uint16)  # 16-bit grey PNG: half and one eighth of full scale
    arr[:, 8:] = 8192
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    px = _unnorm(preprocess_bytes(buf.getvalue(), cfg), cfg)
    assert abs(px[:, 8, 2].mean() - 0.5) < 0.02 and abs(px[:, 8, 13].mean() - 0.125) < 0.02, px[:, 8, :].round(2)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_png_is_composited_onto_white(mode):
    cfg = PreprocessConfig(input_size=(3, 32, 32))
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse([16, 16, 47, 47], fill=(230, 10, 10, 255))
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        img.info["transparency"] = img.getpixel((0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": img.info["transparency"]} if mode == "P" else {}))
    px = _unnorm(preprocess_bytes(buf.getvalue(), cfg), cfg)
    assert px[:, 1, 1].min() > 0.95 and px[:, 30, 30].min() > 0.95, px[:, 1, 1]  # background: white
    centre = px[:, 16, 16]
    assert (centre[0] > 0.8 and centre[1] < 0.2) if mode != "LA" else centre.max() < 0.5  # the circle stays


def test_image_guards(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (12000, 9000)).save(big)  # 108 megapixels
    with pytest.raises(ImageError, match="108.0 megapixels"):
        load_image(big)
    for data, msg in [(b"", "empty"), (b"\x00" * 100, "not a recognised image")]:
        with pytest.raises(ImageError, match=msg):
            preprocess_bytes(data, PreprocessConfig())
