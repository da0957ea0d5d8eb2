"""Image decoding and DINOv2 preprocessing (the reference eval transform).

RGB, shortest edge 256 (bicubic), centre crop 224, scale to [0, 1],
ImageNet mean/std. Decoding and resizing produce uint8 crops; the
normalisation to float happens next to the model (on the device on CUDA),
see :func:`to_model_input`.

The reference is transformers' DINOv2 image processor (``BitImageProcessor``
configured as ``facebook/dinov2-small``'s ``preprocessor_config.json``), which
on PIL input is: ``convert_to_rgb`` -> PIL bicubic resize of the whole image so
that the shortest edge is 256 (long edge ``int(256 * long / short)``) -> centre
crop 224 -> ``/ 255`` -> mean/std. :func:`reference_preprocess` runs it.

How this module matches it, and where it deliberately differs:

- Geometry: the resize size and crop offsets are computed exactly as the
  reference does. With ``fast=False`` the whole image is resized and cropped,
  as the reference does: the reference's uint8 pixels, bit for bit. With
  ``fast`` only the crop's 224 columns are resampled (``Image.resize(...,
  box=...)`` places every output pixel and its filter window in source
  coordinates, so it is the same computation without the wasted columns):
  within 1 grey level of the reference on a few pixels in a thousand (2 on
  some tall images, where Pillow runs its two passes in the other order).
- Alpha: composited onto white, as the reference's ``convert_to_rgb`` does
  (any ``A`` band or a ``transparency`` entry, e.g. palette GIF/PNG).
- 16-bit greyscale (``I;16*``, and ``I``/``F`` holding values above 255) is
  scaled to 8 bits (``/ 257``). Here the reference is not followed: Pillow's
  ``convert("RGB")`` clips such values at 255, so a 16-bit photo comes out
  almost white.
- EXIF orientation (``exif_transpose``, default on): phone cameras store the
  sensor image plus an orientation tag; viewers show it upright, so users
  expect the upright image to be embedded. The reference ignores the tag.
  Turn it off to reproduce the reference on such files.
- ``fast`` (default on): JPEGs much larger than needed are decoded at 1/2,
  1/4 or 1/8 scale by libjpeg-turbo (its scaled IDCT; 1/8 is exactly the
  8 x 8 block mean), keeping at least ``draft_min_scale`` x 256 pixels on
  the shortest edge, then resampled exactly as above; other formats that are
  still far larger than the target use Pillow's ``reducing_gap``. Checked
  against the reference in ``bench/preprocess_speed.py`` (embedding cosine)
  and ``tests/embedding_service/test_preprocess.py``.

Every function is safe to call concurrently from a thread pool: no shared
mutable state; Pillow releases the GIL while decoding and resampling.
"""

from __future__ import annotations

import binascii
import functools
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pybase64
import simplejpeg
import torch
from PIL import Image, ImageFile

from embedding_service.errors import InvalidImage

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Pillow format names accepted. Pillow's JPEG plugin also opens MPO, the JPEG
#: variant some cameras write (a JPEG plus extra frames): its first frame is used.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Register every plugin at import, not lazily from concurrent worker threads.
Image.init()

# Orientation tag value -> the transpose that makes the image upright
# (the same table as PIL.ImageOps.exif_transpose).
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_DATA_URI = re.compile(r"data:(?P<type>[^,]*?)(?P<b64>;base64)?,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are decoded, checked and cropped (see the module docstring).

    crop_size : side of the square crop fed to the model (px).
    resize_shortest_edge : the shortest edge is resized to this before the crop.
    max_image_pixels : width x height limit, read from the header before decoding
        (decompression-bomb guard). Pillow's own guard (``Image.MAX_IMAGE_PIXELS``
        x 2) still refuses larger images whatever this says.
    min_image_size : smallest accepted width and height (px).
    fast : decode large JPEGs at reduced scale and use ``reducing_gap`` for other
        large images (close to, not bit-identical with, the reference).
    exif_transpose : apply the EXIF orientation tag (upright images); the
        reference ignores it.
    draft_min_scale : with ``fast``, a JPEG is decoded at reduced scale only while
        its shortest edge stays >= this x ``resize_shortest_edge``. 1.25 keeps 1/8
        decoding for 12 MP phone photos (3000 / 8 = 375 px) while refusing the
        cases where the bicubic step would have almost nothing left to smooth
        (1080p at 1/4 = 270 px: mean error 2.6 grey levels, against 0.5 at 1/2).
    reducing_gap : with ``fast``, Pillow's ``reducing_gap`` for non-JPEG images
        (and JPEGs still far larger after reduced-scale decoding).
    """

    crop_size: int = 224
    resize_shortest_edge: int = 256
    max_image_pixels: int = 50_000_000
    min_image_size: int = 16
    fast: bool = True
    exif_transpose: bool = True
    draft_min_scale: float = 1.25
    reducing_gap: float = 3.0

    def __post_init__(self) -> None:
        if not 1 <= self.crop_size <= self.resize_shortest_edge:
            raise ValueError(
                f"crop_size ({self.crop_size}) must be between 1 and resize_shortest_edge "
                f"({self.resize_shortest_edge})"
            )
        if self.max_image_pixels < 1 or self.min_image_size < 1:
            raise ValueError("max_image_pixels and min_image_size must be >= 1")
        if self.draft_min_scale < 1.0 or self.reducing_gap < 1.0:
            raise ValueError("draft_min_scale and reducing_gap must be >= 1")

    def describe(self) -> dict[str, Any]:
        """JSON-able description (``GET /info`` ``preprocessing``)."""
        return {
            "reference": "transformers BitImageProcessor (facebook/dinov2-small "
            "preprocessor_config): convert_to_rgb, resize shortest edge, centre crop, "
            "rescale 1/255, normalize",
            "resize_shortest_edge": self.resize_shortest_edge,
            "resample": "bicubic",
            "crop_size": self.crop_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "normalized_on": "model device",
            "alpha": "composited on white (as the reference)",
            "formats": list(SUPPORTED_FORMATS),
            "exif_transpose": self.exif_transpose,
            "fast": self.fast,
            "fast_details": (
                f"JPEG reduced-scale (DCT) decoding keeping >= {self.draft_min_scale:g} x "
                f"{self.resize_shortest_edge} px on the shortest edge; reducing_gap "
                f"{self.reducing_gap:g} for other large images"
                if self.fast
                else None
            ),
            "max_image_pixels": self.max_image_pixels,
            "min_image_size": self.min_image_size,
        }


# ---------------------------------------------------------------------------
# base64


def decode_base64(data: str, index: int = 0) -> bytes:
    """Bytes of a plain base64 string or a ``data:[<type>];base64,<data>`` URI.

    Standard or URL-safe alphabet; whitespace (line wrapping) is ignored and
    missing ``=`` padding is tolerated; anything else that is not base64 raises
    ``InvalidImage(reason="invalid_base64")``.
    """

    def fail(why: str) -> InvalidImage:
        return InvalidImage(
            f"image {index} is not valid base64: {why}", index=index, reason="invalid_base64"
        )

    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            raise fail("it contains non-ASCII bytes") from None
    if not isinstance(data, str):
        raise fail(f"expected a string, got {type(data).__name__}")
    if data[:5].lower() == "data:":
        match = _DATA_URI.match(data)
        if match is None:
            raise fail("a data: URI needs a ',' before its data")
        if not match.group("b64"):
            raise fail("only base64 data: URIs (data:image/...;base64,...) are accepted")
        data = data[match.end() :]
    try:
        # Fast path: well-formed standard base64 (what nearly every client sends).
        # pybase64 (SIMD) decodes a 3.5 MB phone photo in 0.3 ms where the
        # standard library takes 11 ms, holding the GIL (docs/benchmarks/preprocess.md).
        out = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        out = _lenient_b64decode(data, fail)
    if not out:
        raise fail("it is empty")
    return out


def _lenient_b64decode(data: str, fail: Any) -> bytes:
    if not data.isascii():
        raise fail("it contains non-ASCII characters")
    text = _WHITESPACE.sub("", data)
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise fail("its length is not possible for base64 (truncated?)")
    text += "=" * (-len(text) % 4)
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        bad = sorted({c for c in text if not (c.isalnum() or c in "+/=")})[:5]
        why = f"unexpected characters {bad!r}" if bad else "misplaced '=' padding"
        raise fail(why) from None


# ---------------------------------------------------------------------------
# decoding


def _open(raw: bytes, cfg: PreprocessConfig, index: int) -> Image.Image:
    """Identify the image and check its header (format, size) without decoding pixels."""
    if not raw:
        raise InvalidImage(f"image {index} is empty", index=index, reason="not_an_image")
    try:
        img = Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(index, cfg, str(exc)) from None
    except Exception as exc:  # whatever a plugin raises on a crafted header
        raise _unidentified(raw, index, exc) from None
    width, height = img.size
    if width * height > cfg.max_image_pixels:
        raise _too_many_pixels(index, cfg, f"{width}x{height} = {width * height} pixels")
    if min(width, height) < cfg.min_image_size:
        raise InvalidImage(
            f"image {index} is too small: {width}x{height}, width and height must be at "
            f"least {cfg.min_image_size} px",
            index=index,
            reason="too_small",
        )
    return img


def _too_many_pixels(index: int, cfg: PreprocessConfig, detail: str) -> InvalidImage:
    return InvalidImage(
        f"image {index} has too many pixels ({detail}); the limit is {cfg.max_image_pixels}",
        index=index,
        reason="too_many_pixels",
    )


def _unidentified(raw: bytes, index: int, exc: BaseException) -> InvalidImage:
    """Tell "an image format we do not take" from "not an image (or a broken header)"."""
    try:
        with Image.open(io.BytesIO(raw)) as other:
            fmt = other.format
    except Exception:
        fmt = None
    if fmt is not None and fmt not in (*SUPPORTED_FORMATS, "MPO"):
        return InvalidImage(
            f"image {index} is {fmt}, which is not supported; send one of "
            f"{', '.join(SUPPORTED_FORMATS)}",
            index=index,
            reason="unsupported_format",
        )
    return InvalidImage(
        f"image {index} is not a readable image ({exc})", index=index, reason="not_an_image"
    )


def _load(img: Image.Image, index: int) -> None:
    """Decode the pixels; a file that ends early is an error, never half an image."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide switch someone turned on
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    try:
        img.load()
    except Image.DecompressionBombError as exc:  # e.g. a TIFF whose frames grow
        raise InvalidImage(f"image {index}: {exc}", index=index, reason="too_many_pixels") from None
    except Exception as exc:
        message = str(exc)
        if "truncated" in message or isinstance(exc, EOFError):
            raise InvalidImage(
                f"image {index} is truncated (the file ends before the image data does)",
                index=index,
                reason="truncated",
            ) from None
        raise InvalidImage(
            f"image {index} could not be decoded: {message or type(exc).__name__}",
            index=index,
            reason="corrupt",
        ) from None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block must not refuse a decodable image
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the reference's ``convert_to_rgb`` (alpha on white), 16-bit scaled to 8."""
    if img.mode.startswith("I;16") or (img.mode in ("I", "F") and img.getextrema()[1] > 255):
        array = np.asarray(img, dtype=np.float32)
        array = np.clip(array, 0, 65535) / 257.0
        img = Image.fromarray(np.rint(array).astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _jpeg_scale(width: int, height: int, cfg: PreprocessConfig) -> int:
    """1, 2, 4 or 8: the JPEG reduced-scale decoding factor ``cfg`` allows."""
    if cfg.fast:
        needed = cfg.resize_shortest_edge * cfg.draft_min_scale
        for scale in (8, 4, 2):
            if min(width, height) / scale >= needed:
                return scale
    return 1


def _decode(
    img: Image.Image, raw: bytes, cfg: PreprocessConfig, index: int
) -> tuple[Image.Image, int]:
    """Decode the pixels of an opened image: ``(decoded image, scale)``.

    JPEGs are decoded at ``1 / scale`` of their size (see :func:`_jpeg_scale`).
    YCbCr and greyscale JPEGs go through simplejpeg (libjpeg-turbo's TurboJPEG API:
    the same pixels as Pillow, with less overhead); it refuses anything libjpeg
    so much as warns about, and those files go through Pillow, which tells a
    truncated file from a merely untidy one.
    """
    width, height = img.size
    if img.format not in ("JPEG", "MPO"):
        _load(img, index)
        return img, 1
    scale = _jpeg_scale(width, height, cfg)
    if img.mode in ("RGB", "L"):
        out_w, out_h = -(-width // scale), -(-height // scale)
        try:
            array = simplejpeg.decode_jpeg(raw, "RGB", min_width=out_w, min_height=out_h)
        except ValueError:
            pass
        else:
            if array.shape == (out_h, out_w, 3):
                return Image.fromarray(array, mode="RGB"), scale
    if scale > 1:
        result = img.draft(img.mode, (width // scale, height // scale))
        scale = round(width / result[1][2]) if result is not None else 1
    _load(img, index)
    return img, scale


def load_image(raw: bytes, cfg: PreprocessConfig, index: int = 0) -> Image.Image:
    """Decode ``raw`` into an RGB image at full resolution, limits checked.

    EXIF orientation is applied when ``cfg.exif_transpose``. Raises
    ``InvalidImage`` (with ``index`` and ``reason``) for every per-image problem.
    """
    img = _open(raw, cfg, index)
    _load(img, index)
    orientation = _orientation(img) if cfg.exif_transpose else 1
    try:
        if orientation != 1:
            img = img.transpose(_ORIENTATION_TRANSPOSE[orientation])
        return _to_rgb(img)
    except (ValueError, OSError) as exc:
        raise InvalidImage(
            f"image {index} could not be converted to RGB: {exc}", index=index, reason="corrupt"
        ) from None


def _target_geometry(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """Reference resize size and crop offsets: ``(new_w, new_h, left, top)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = cfg.resize_shortest_edge, int(cfg.resize_shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_w, new_h, (new_w - cfg.crop_size) // 2, (new_h - cfg.crop_size) // 2


def preprocess_image(raw: bytes, cfg: PreprocessConfig, index: int = 0) -> np.ndarray:
    """Encoded image bytes -> uint8 ``(crop, crop, 3)`` RGB crop (HWC), as the reference.

    Raises ``InvalidImage`` (with ``index`` and ``reason``) for every per-image problem.
    """
    img = _open(raw, cfg, index)
    try:
        return _preprocess_opened(img, raw, cfg, index)
    except (InvalidImage, MemoryError):
        raise
    except Exception as exc:  # a malformed file must cost a 422, never the worker
        raise InvalidImage(
            f"image {index} could not be decoded: {type(exc).__name__}: {exc}",
            index=index,
            reason="corrupt",
        ) from None


def _preprocess_opened(
    img: Image.Image, raw: bytes, cfg: PreprocessConfig, index: int
) -> np.ndarray:
    width, height = img.size  # before any reduced-scale decoding
    decoded, scale = _decode(img, raw, cfg, index)
    orientation = _orientation(img) if cfg.exif_transpose else 1
    if orientation != 1:
        decoded = decoded.transpose(_ORIENTATION_TRANSPOSE[orientation])
        if orientation in _SWAPS_AXES:
            width, height = height, width
    img = _to_rgb(decoded)

    new_w, new_h, left, top = _target_geometry(width, height, cfg)
    crop = cfg.crop_size
    if cfg.fast:
        out = _resize_crop_fast(img, (width, height), (new_w, new_h), (left, top), scale, cfg)
    else:
        out = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        out = out.crop((left, top, left + crop, top + crop))
    return np.array(out, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only


def _resize_crop_fast(
    img: Image.Image,
    size: tuple[int, int],
    new_size: tuple[int, int],
    offset: tuple[int, int],
    scale: int,
    cfg: PreprocessConfig,
) -> Image.Image:
    """The reference's resize + centre crop, resampling only the columns that survive.

    ``size`` is the original (upright) image size, ``new_size`` the reference's resize
    target, ``offset`` its crop's top-left corner; ``img`` was decoded at
    ``1 / scale`` (libjpeg divides source coordinates by exactly ``scale``).
    Output column x of the reference's resize samples the source around
    ``(x + 0.5) * width / new_w``; Pillow's ``box`` places it at the same spot, so
    only the surviving columns are computed. Rows are resampled in full and cropped
    afterwards: cropping them with the box too changes where Pillow clips its
    intermediate (horizontal-pass) values to 0..255, up to 8 grey levels away
    from the reference; cropping columns alone stays within 1.
    """
    (width, height), (new_w, new_h), (left, top) = size, new_size, offset
    crop = cfg.crop_size
    sx = width / new_w / scale
    box = (left * sx, 0.0, (left + crop) * sx, height / scale)
    out = img.resize(
        (crop, new_h), Image.Resampling.BICUBIC, box=box, reducing_gap=cfg.reducing_gap
    )
    return out.crop((0, top, crop, top + crop))


def preprocess_base64(data: str, cfg: PreprocessConfig, index: int = 0) -> np.ndarray:
    """:func:`decode_base64` then :func:`preprocess_image`."""
    return preprocess_image(decode_base64(data, index), cfg, index)


# ---------------------------------------------------------------------------
# model input


def to_model_input(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> normalised ``(B, 3, H, W)`` in ``dtype`` on ``batch.device``.

    ``(x / 255 - mean) / std`` computed in float32 in the reference's order (so
    on CUDA the normalisation runs on the GPU), then cast to ``dtype``.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 (B, H, W, 3) tensor, got {batch.dtype} {tuple(batch.shape)}"
        )
    device = batch.device
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    x = x.div_(255.0).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


# ---------------------------------------------------------------------------
# reference (tests and benchmarks)

#: facebook/dinov2-small's preprocessor_config.json (the same for every DINOv2 size).
DINOV2_PROCESSOR_CONFIG: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}


@functools.cache
def reference_processor() -> Any:
    """transformers' DINOv2 image processor, PIL backend, configured as dinov2-small.

    The PIL backend (``BitImageProcessorPil``) is used even where torchvision is
    installed: it resizes with Pillow, as the official DINOv2 eval transform
    (torchvision transforms on PIL images) does.
    """
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(**DINOV2_PROCESSOR_CONFIG)


def reference_preprocess(image: Image.Image) -> np.ndarray:
    """float32 ``(3, 224, 224)``: the reference transform of an opened PIL image."""
    out = reference_processor()(images=image, return_tensors="np")["pixel_values"]
    return np.asarray(out[0], dtype=np.float32)


__all__ = [
    "DINOV2_PROCESSOR_CONFIG",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_FORMATS",
    "PreprocessConfig",
    "decode_base64",
    "load_image",
    "preprocess_base64",
    "preprocess_image",
    "reference_preprocess",
    "to_model_input",
]
