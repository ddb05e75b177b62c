"""Command-line image arguments -> image files (folders expanded, other files skipped)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def looks_like_image(p: Path) -> bool:
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return True
    from PIL import Image, UnidentifiedImageError

    try:  # no image suffix: ask PIL whether the header is an image format (reads a few bytes)
        with Image.open(p):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def expand_image_args(args: list[str]) -> tuple[list[str], list[str]]:
    """-> (image files, skipped files). A folder gives its image files (sorted, not recursive);
    a file that is not an image (a README caught by a glob) is skipped with a warning. Missing
    paths and damaged images are kept, so the caller reports them as errors."""
    images, skipped = [], []
    for a in args:
        p = Path(a)
        if p.is_dir():
            inside = sorted(x for x in p.iterdir() if x.is_file())
            found = [x for x in inside if looks_like_image(x)]
            skipped += [str(x) for x in inside if x not in found]
            if not found:
                log.warning("%s: no image files in this folder", a)
            images += [str(x) for x in found]
        elif p.is_file() and not looks_like_image(p):
            skipped.append(a)
        else:
            images.append(a)
    for s in skipped:
        log.warning("skipping %s: not an image file", s)
    return images, skipped
