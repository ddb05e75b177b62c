"""Image decoding and preprocessing shared by training, evaluation, export and serving.

Numbers (input size, mean, std, interpolation) come from the encoder's timm data config,
never from constants here. Only PIL + numpy, so the Triton Python backend can use it
without torch.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# Decoded pixels we accept before refusing an image (a 100-megapixel upload is refused
# before it is decoded; PIL's own bomb check would only warn below 2x its limit).
DEFAULT_MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = None  # our own bound below replaces PIL's warning/exception
ImageFile.LOAD_TRUNCATED_IMAGES = False

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
        from timm.data import resolve_data_config

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


def load_image(src: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None,
               draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully into RGB, refusing empty, non-image, truncated and oversized input.
    `draft_size` lets JPEG decode at a reduced scale (>= that size) which is much faster."""
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
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{label}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels, "
                                 f"over the limit of {max_pixels / 1e6:.1f} megapixels")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not a recognised image format") from None
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
    """`max_pixels` lowers the cap of `cfg` for this call (serving accepts less than ingest)."""
    _, H, W = cfg.input_size
    cap = cfg.max_pixels if max_pixels is None else min(cfg.max_pixels, max_pixels)
    return preprocess(load_image(data, cap, name=name, draft_size=(W, H)), cfg)


def preprocess_path(path: str | Path, cfg: PreprocessConfig, name: str | None = None) -> np.ndarray:
    _, H, W = cfg.input_size
    return preprocess(load_image(path, cfg.max_pixels, name=name, draft_size=(W, H)), cfg)
