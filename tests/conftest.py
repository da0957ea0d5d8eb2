"""Image fixtures shared by every test: real photographs and encoders.

The photos ship with scikit-learn (china, flower) and scikit-image
(astronaut, coffee, chelsea, rocket), so nothing is downloaded. Helpers are
exposed as fixtures (``encode_image``, ``to_base64``) because tests run with
``--import-mode=importlib`` and cannot import this module.
"""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for tests.support and bench (--import-mode=importlib)
    sys.path.insert(0, str(ROOT))

# the services (embedding, clustering, PostgreSQL) the HTTP tests of every package share
pytest_plugins = ["tests.support.fixtures"]

#: Formats every image endpoint accepts (Pillow names) and the file each fixture writes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
PHONE_SIZE = (4000, 3000)
SMALL_SIZE = (500, 375)


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {"china": sample.images[0], "flower": sample.images[1]}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photos[name] = np.asarray(getattr(skimage.data, name)())
    photos["portrait"] = photos["china"][:, 170:470]  # 427 x 300, taller than wide
    return photos


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **save: Any) -> bytes:
    """Encode an array or PIL image; JPEG defaults to quality 90, WebP to lossless."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    fmt = fmt.upper()
    if fmt == "JPEG":
        save.setdefault("quality", 90)
    if fmt == "WEBP":
        save.setdefault("lossless", True)
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    """Real photographs as uint8 RGB arrays (H, W, 3), different sizes and aspect ratios."""
    return _photos()


@pytest.fixture(scope="session")
def encode_image() -> Callable[..., bytes]:
    """``encode_image(array_or_pil, fmt="JPEG", **save_kwargs) -> bytes``."""
    return encode


@pytest.fixture(scope="session")
def to_base64() -> Callable[[bytes], str]:
    """``to_base64(data) -> str`` (standard alphabet, padded)."""
    return lambda data: base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="session")
def photo_jpegs(photo_arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Every photo as a quality-90 JPEG."""
    return {name: encode(array) for name, array in photo_arrays.items()}


@pytest.fixture(scope="session")
def format_samples(photo_arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The coffee photo in every accepted format (WebP lossless; GIF is palette-quantised)."""
    return {fmt: encode(photo_arrays["coffee"], fmt) for fmt in IMAGE_FORMATS}


@pytest.fixture(scope="session")
def small_jpeg(photo_arrays: dict[str, np.ndarray]) -> bytes:
    """A typical web image: the china photo at 500 x 375, quality 90."""
    return encode(Image.fromarray(photo_arrays["china"]).resize(SMALL_SIZE, Image.BICUBIC))


@pytest.fixture(scope="session")
def phone_jpeg(photo_arrays: dict[str, np.ndarray]) -> bytes:
    """A phone-size (4000 x 3000, 12 MP) quality-90 JPEG: the china photo upscaled."""
    return encode(Image.fromarray(photo_arrays["china"]).resize(PHONE_SIZE, Image.BICUBIC))
