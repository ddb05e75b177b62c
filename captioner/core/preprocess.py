"""Image decoding and preprocessing shared by training, evaluation, export and serving.

Numbers (input size, mean, std, interpolation) come from the encoder's timm data config,
never from constants here. Only PIL + numpy, so the Triton Python backend can use it
without torch.

Every path (ingest checks, training, evaluation, export parity, serving) decodes through
`load_image`: only ACCEPTED_FORMATS, canvas size and aspect ratio checked on the header
before decoding, JPEG draft / box reduce before resizing, EXIF orientation applied, 16-bit
modes scaled to 8 bits, transparency composited onto white (as image viewers show it).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps
from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin  # noqa: F401
from PIL import WebPImagePlugin  # noqa: F401 - registers the accepted decoders (Image.open(formats=...))

# Decoded pixels we accept before refusing an image (checked on the header, before decoding;
# PIL's own bomb check would only warn below 2x its limit). Ingest and training accept large
# photographs; serving has a much lower cap because it decodes untrusted uploads on demand.
DEFAULT_MAX_PIXELS = 50_000_000
SERVING_MAX_PIXELS = 16_000_000
MAX_ASPECT_RATIO = 20.0  # longer side / shorter side; a 1 x 49,000,000 PNG costs 2 GiB to decode
# The only decoders PIL may use (others, e.g. EPS via Ghostscript, are never tried), and the
# file extension ingest stores each under.
# (MPO, the multi-picture JPEG many cameras write, opens through the JPEG decoder.)
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
Image.MAX_IMAGE_PIXELS = None  # our own bound below replaces PIL's warning/exception
ImageFile.LOAD_TRUNCATED_IMAGES = False
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")  # Image.reduce averages values: no palettes

_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImageError(ValueError):
    """An image could not be used; the message says which and why."""


@dataclass
class PreprocessConfig:
    input_size: tuple = (3, 224, 224)
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_model(cls, encoder_backbone) -> "PreprocessConfig":
        from timm.data import resolve_data_config  # timm loads torch: core imports it only with a model at hand

        dc = resolve_data_config({}, model=encoder_backbone)
        return cls(input_size=tuple(int(x) for x in dc["input_size"]), mean=tuple(float(x) for x in dc["mean"]),
                   std=tuple(float(x) for x in dc["std"]), interpolation=str(dc.get("interpolation", "bicubic")))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        for k in ("input_size", "mean", "std"):
            d[k] = tuple(d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("input_size", "mean", "std"):
            d[k] = list(d[k])
        return d


def open_image(src: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None):
    """Open (header only) an image of an accepted format whose canvas is within `max_pixels` and
    MAX_ASPECT_RATIO; raises ImageError naming it. Nothing is decoded yet."""
    label = name or (str(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>")
    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise ImageError(f"{label}: empty image data (0 bytes)")
        fp = io.BytesIO(src)
    else:
        fp = str(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(fp, formats=ACCEPTED_FORMATS)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except Image.UnidentifiedImageError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # name the format when PIL knows it, so the refusal is actionable
                other = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)).format
            except Exception:  # noqa: BLE001 - unknown to PIL as well
                other = None
        what = f"{other} is not an accepted image format" if other else "not a recognised image format"
        raise ImageError(f"{label}: {what} (accepted: {', '.join(ACCEPTED_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{label}: cannot decode image ({e})") from None
    w, h = img.size
    why = None
    if w * h > max_pixels:
        why = f"{w * h / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:.1f} megapixels"
    elif max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        why = f"an aspect ratio over the limit of {MAX_ASPECT_RATIO:g}:1"
    if why:
        img.close()
        raise ImageError(f"{label}: image is {w}x{h}{' =' if 'mega' in why else ','} {why}")
    return img


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as image viewers do; unreadable EXIF leaves pixels as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block is metadata, not a broken image
        pass
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit modes scaled (not clipped), transparency composited onto white."""
    if img.mode in _SIXTEEN_BIT:  # 0..65535 -> 0..255 (mode "I" is how older Pillow opens 16-bit PNG)
        a = np.asarray(img)
        a = (np.clip(a, 0, 65535) >> 8) if a.dtype.kind == "i" else (a >> 8)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def load_image(src: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None,
               draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image into upright 8-bit RGB, refusing empty, non-image, truncated, oversized,
    extreme-aspect and not-accepted-format input (see `open_image`). With `draft_size`, JPEG
    decodes at a reduced scale and other formats are box-reduced right after decoding, so
    later work never touches more than ~2x the pixels the caller needs."""
    img = open_image(src, max_pixels, name)
    label = name or (str(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (max(draft_size), max(draft_size)))  # square: orientation may swap sides
            img.load()
            if draft_size is not None and img.mode in _REDUCIBLE:  # keeps >= 2x the target on each side
                f = min(img.size) // (2 * max(draft_size))
                if f >= 2:
                    img = img.reduce(f)  # keeps info["exif"], so the orientation still applies
            return _to_rgb(_orient(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: cannot decode image ({e})") from None


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W], resized to the encoder's input size (whole image,
    no crop: captions describe the whole picture) and normalised with its mean/std."""
    _, H, W = cfg.input_size
    img = img.resize((W, H), _INTERP.get(cfg.interpolation, Image.Resampling.BICUBIC))
    x = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_bytes(data: bytes, cfg: PreprocessConfig, name: str | None = None,
                     max_pixels: int | None = None) -> np.ndarray:
    """Encoded image -> model input. `max_pixels` lowers the cap of `cfg` (the ingest cap) for
    this call: servers pass SERVING_MAX_PIXELS."""
    _, H, W = cfg.input_size
    cap = cfg.max_pixels if max_pixels is None else min(cfg.max_pixels, max_pixels)
    return preprocess(load_image(data, cap, name=name, draft_size=(W, H)), cfg)


def preprocess_path(path: str | Path, cfg: PreprocessConfig, name: str | None = None,
                    max_pixels: int | None = None) -> np.ndarray:
    _, H, W = cfg.input_size
    cap = cfg.max_pixels if max_pixels is None else max_pixels
    return preprocess(load_image(path, cap, name=name, draft_size=(W, H)), cfg)
