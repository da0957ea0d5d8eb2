"""Small WebP thumbnails of ingested images, for the dashboard.

JPEGs are decoded at reduced scale (``Image.draft``), EXIF orientation is
applied and 16-bit greyscale is scaled to 8 bits (as the embedding service does:
Pillow's own conversion clips it, a white thumbnail), and the result fits in a
``size`` x ``size`` box. A thumbnail is a convenience: an image Pillow cannot
read here (the embedding service accepted it) simply gets none.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pybase64
from PIL import Image, ImageOps

log = logging.getLogger(__name__)


def decode_base64_image(data: str) -> bytes:
    """Bytes of a base64 image or ``data:...;base64,`` URI."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    return pybase64.b64decode(data, validate=False)


def make_thumbnail(image_b64: str, size: int = 96, quality: int = 80) -> bytes | None:
    """WebP bytes of the image shrunk to fit ``size`` px, or None when it cannot be read."""
    try:
        with Image.open(io.BytesIO(decode_base64_image(image_b64))) as img:
            img.draft("RGB", (size * 2, size * 2))
            img = _eight_bit(ImageOps.exif_transpose(img))
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            img.save(out, "WEBP", quality=quality, method=4)
            return out.getvalue()
    except Exception as exc:  # any unreadable image: no thumbnail, never a failed ingest
        log.debug("no thumbnail: %s", exc)
        return None


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale scaled to 8 bits, as the embedding service does."""
    if img.mode.startswith("I;16") or (img.mode in ("I", "F") and img.getextrema()[1] > 255):
        array = np.clip(np.asarray(img, dtype=np.float32), 0, 65535) / 257.0
        return Image.fromarray(np.rint(array).astype(np.uint8))  # "L"
    return img
