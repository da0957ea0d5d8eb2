"""Decoding, checks and DINOv2 preprocessing against the reference image processor."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from embedding_service.errors import InvalidImage
from embedding_service.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    decode_base64,
    load_image,
    preprocess_base64,
    preprocess_image,
    reference_preprocess,
    to_model_input,
)

EXACT = PreprocessConfig(fast=False)
FAST = PreprocessConfig()
MEAN = np.asarray(IMAGENET_MEAN, np.float64)
STD = np.asarray(IMAGENET_STD, np.float64)


def reference_u8(image: Image.Image | bytes) -> np.ndarray:
    """The reference transform's crop in grey levels, (224, 224, 3) float64."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    pixels = reference_preprocess(image).transpose(1, 2, 0).astype(np.float64)
    return (pixels * STD + MEAN) * 255.0


def grey_diff(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    return np.abs(ours.astype(np.float64) - ref)


def normalised_cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    a = ((ours / 255.0 - MEAN) / STD).ravel()
    b = ((ref / 255.0 - MEAN) / STD).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 1-bit pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def reason_of(raw: bytes, cfg: PreprocessConfig = FAST, index: int = 3) -> str:
    with pytest.raises(InvalidImage) as caught:
        preprocess_image(raw, cfg, index)
    error = caught.value
    assert error.extra["index"] == index
    assert f"image {index}" in error.message
    assert error.body()["error"]["type"] == "invalid_image"
    return error.extra["reason"]


# --- parity with the reference ------------------------------------------------------


def test_exact_path_matches_the_reference_on_real_photos(photo_jpegs: dict[str, bytes]) -> None:
    for name, raw in photo_jpegs.items():
        # fast=False: the reference's own pixels (up to its float round trip).
        assert grey_diff(preprocess_image(raw, EXACT), reference_u8(raw)).max() < 1e-3, name


def test_fast_path_without_reduced_decoding_is_within_one_grey_level(
    photo_jpegs: dict[str, bytes], small_jpeg: bytes
) -> None:
    """Only the crop's columns are resampled (a float box): rare 1-level rounding flips."""
    for name, raw in [*photo_jpegs.items(), ("small", small_jpeg)]:
        diff = grey_diff(preprocess_image(raw, FAST), reference_u8(raw))
        assert diff.max() <= 1.0 + 1e-3, name
        assert (diff > 0.5).mean() < 1e-3, name


def test_phone_size_jpeg_fast_path_stays_close_to_the_reference(phone_jpeg: bytes) -> None:
    ref = reference_u8(phone_jpeg)
    exact = preprocess_image(phone_jpeg, EXACT)
    assert grey_diff(exact, ref).max() < 1e-3
    fast = preprocess_image(phone_jpeg, FAST)
    diff = grey_diff(fast, ref)
    # Decoding at 1/8 scale is an 8x8 block mean before the bicubic filter: a
    # slightly softer image. bench/preprocess_speed.py measures <= 1.3 grey
    # levels mean on real-detail 12 MP mosaics, DINOv2 CLS cosine >= 0.9999
    # (a 1-px crop shift: 0.987); limits here leave room for other photos.
    assert diff.mean() < 1.5
    assert normalised_cosine(fast, ref) > 0.999


def test_fast_path_on_a_detailed_mid_size_jpeg(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes]
) -> None:
    """1080p of real detail (a mosaic of native-resolution photos): decoded at 1/2."""
    canvas = Image.new("RGB", (1920, 1080))
    x = 0
    for array in photo_arrays.values():
        canvas.paste(Image.fromarray(array), (x, 0))
        canvas.paste(Image.fromarray(array[::-1]), (x, 540))
        x += array.shape[1]
    raw = encode_image(canvas)
    ref = reference_u8(raw)
    fast = preprocess_image(raw, FAST)
    assert grey_diff(fast, ref).mean() < 1.0
    assert normalised_cosine(fast, ref) > 0.999


def test_large_png_fast_path_uses_reducing_gap_and_stays_close(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes]
) -> None:
    big = Image.fromarray(photo_arrays["astronaut"]).resize((2048, 2048), Image.BICUBIC)
    raw = encode_image(big, "PNG", compress_level=1)
    ref = reference_u8(raw)
    assert grey_diff(preprocess_image(raw, EXACT), ref).max() < 1e-3
    diff = grey_diff(preprocess_image(raw, FAST), ref)
    assert diff.mean() < 1.0
    assert diff.max() < 16


def test_portrait_geometry_follows_the_reference(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes]
) -> None:
    for size in [(300, 427), (257, 1000), (1000, 257), (224, 224), (16, 40)]:
        raw = encode_image(Image.fromarray(photo_arrays["coffee"]).resize(size), "PNG")
        ref = reference_u8(raw)
        assert grey_diff(preprocess_image(raw, EXACT), ref).max() < 1e-3, size
        # Pillow 13 picks the order of its two passes per resize (vertical first
        # when the height shrinks more); resampling fewer columns can flip it, and
        # the intermediate rounding with it: at most 2 grey levels, on few pixels.
        diff = grey_diff(preprocess_image(raw, FAST), ref)
        assert diff.max() <= 2.0 + 1e-3 and diff.mean() < 0.1, size


# --- formats and modes ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_matches_the_reference(
    format_samples: dict[str, bytes], fmt: str
) -> None:
    raw = format_samples[fmt]
    assert Image.open(io.BytesIO(raw)).format == fmt
    ours = preprocess_base64(base64.b64encode(raw).decode(), FAST)
    assert grey_diff(ours, reference_u8(raw)).max() <= 1.0 + 1e-3


def test_lossless_formats_decode_to_the_same_pixels(format_samples: dict[str, bytes]) -> None:
    crops = [preprocess_image(format_samples[f], FAST) for f in ("PNG", "WEBP", "BMP", "TIFF")]
    for crop in crops[1:]:
        np.testing.assert_array_equal(crop, crops[0])


def test_animated_gif_uses_the_first_frame(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes]
) -> None:
    first = Image.fromarray(photo_arrays["chelsea"])
    black = Image.new("RGB", first.size)
    raw = encode_image(first, "GIF", save_all=True, append_images=[black], duration=100)
    assert getattr(Image.open(io.BytesIO(raw)), "n_frames", 1) == 2
    ours = preprocess_image(raw, FAST)
    assert ours.mean() > 40
    assert grey_diff(ours, reference_u8(raw)).max() <= 1.0 + 1e-3


def _mode_images(photo: np.ndarray) -> dict[str, Image.Image]:
    rgb = Image.fromarray(photo)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, photo.shape[1]), (photo.shape[0], 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha.convert("L"))
    la = rgb.convert("L")
    la.putalpha(alpha.convert("L"))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    return {
        "RGBA": rgba,
        "LA": la,
        "P": palette,
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK"])
def test_modes_convert_to_rgb_like_the_reference(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes], mode: str
) -> None:
    """Alpha (a band or palette transparency) is composited on white, as the reference does."""
    image = _mode_images(photo_arrays["coffee"])[mode]
    fmt = {"CMYK": "TIFF", "1": "BMP"}.get(mode, "PNG")
    raw = encode_image(image, fmt)
    assert Image.open(io.BytesIO(raw)).mode == mode
    ours = preprocess_image(raw, FAST)
    assert grey_diff(ours, reference_u8(raw)).max() <= 1.0 + 1e-3


def test_transparent_pixels_become_white(encode_image: Callable[..., bytes]) -> None:
    clear = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    assert (preprocess_image(encode_image(clear, "PNG"), FAST) == 255).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_files_match_the_reference(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes], fmt: str
) -> None:
    raw = encode_image(Image.fromarray(photo_arrays["flower"]).convert("CMYK"), fmt)
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"
    assert grey_diff(preprocess_image(raw, FAST), reference_u8(raw)).max() <= 1.0 + 1e-3


def test_greyscale_jpeg_matches_the_reference(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes]
) -> None:
    raw = encode_image(Image.fromarray(photo_arrays["rocket"]).convert("L"))
    ours = preprocess_image(raw, FAST)
    assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 1] == ours[..., 2]).all()
    assert grey_diff(ours, reference_u8(raw)).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(
    encode_image: Callable[..., bytes], fmt: str
) -> None:
    """Deliberate difference: the reference clips 16-bit values at 255 (a white image)."""
    values = np.tile(np.linspace(0, 65535, 256), (256, 1)).astype(np.uint16)
    raw = encode_image(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(raw)).mode.startswith("I;16")
    ours = preprocess_image(raw, EXACT)
    expected = np.rint(values[16:240, 16:240] / 257.0)
    assert np.abs(ours[..., 0] - expected).max() <= 1
    assert (ours[..., 0] == ours[..., 2]).all()
    assert reference_u8(raw).min() > 250  # what the reference makes of it


def test_load_image_returns_full_size_rgb(photo_jpegs: dict[str, bytes]) -> None:
    img = load_image(photo_jpegs["portrait"], FAST)
    assert (img.mode, img.size) == ("RGB", (300, 427))


# --- EXIF orientation -------------------------------------------------------------


def _with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """What a camera writes: the pixels as the sensor saw them plus the tag to undo it."""
    undo = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    return image.transpose(undo[orientation]) if orientation in undo else image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes], orientation: int
) -> None:
    upright = Image.fromarray(photo_arrays["portrait"])
    stored = _with_orientation(upright, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = encode_image(stored, "PNG", exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).size == upright.size
    ours = preprocess_image(raw, FAST)
    assert grey_diff(ours, reference_u8(upright)).max() <= 1.0 + 1e-3
    ignored = preprocess_image(raw, PreprocessConfig(exif_transpose=False))
    assert grey_diff(ignored, reference_u8(raw)).max() <= 1.0 + 1e-3  # the reference ignores it


def test_rotated_phone_photo_is_upright_on_the_fast_path(
    photo_arrays: dict[str, np.ndarray], encode_image: Callable[..., bytes]
) -> None:
    upright = Image.fromarray(photo_arrays["portrait"]).resize((3000, 4000), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = encode_image(_with_orientation(upright, 6), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(raw)).size == (4000, 3000)
    ours = preprocess_image(raw, FAST)
    ref = reference_u8(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))))
    assert grey_diff(ours, ref).mean() < 1.5
    assert normalised_cosine(ours, ref) > 0.999
    assert load_image(raw, FAST).size == (3000, 4000)


# --- bad inputs -------------------------------------------------------------------


def test_loading_truncated_images_stays_disabled() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_truncated_jpeg_is_refused(
    phone_jpeg: bytes,
    photo_arrays: dict[str, np.ndarray],
    encode_image: Callable[..., bytes],
    progressive: bool,
    keep: float,
) -> None:
    for raw in (phone_jpeg, encode_image(photo_arrays["china"], progressive=progressive)):
        if progressive:
            raw = encode_image(Image.open(io.BytesIO(raw)), progressive=True)
        cut = raw[: int(len(raw) * keep)]
        for cfg in (FAST, EXACT):
            assert reason_of(cut, cfg) == "truncated"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files_of_other_formats_are_refused(
    format_samples: dict[str, bytes], fmt: str
) -> None:
    raw = format_samples[fmt]
    assert reason_of(raw[: len(raw) // 2]) in {"truncated", "corrupt", "not_an_image"}


def test_corrupt_jpeg_data_is_refused_or_decoded_never_crashes(phone_jpeg: bytes) -> None:
    rng = np.random.default_rng(0)
    raw = bytearray(phone_jpeg)
    raw[2000:] = rng.integers(0, 256, len(raw) - 2000, dtype=np.uint8).tobytes()
    try:
        out = preprocess_image(bytes(raw), FAST, 3)
    except InvalidImage as exc:
        assert exc.extra["index"] == 3
    else:
        assert out.shape == (224, 224, 3)


def test_mutated_files_only_ever_raise_invalid_image(format_samples: dict[str, bytes]) -> None:
    """Bytes flipped in headers and data: a 422 for that image or a crop, nothing else."""
    rng = np.random.default_rng(1)
    for fmt, raw in format_samples.items():
        for trial in range(12):
            data = bytearray(raw)
            span = 300 if trial % 2 else len(data)  # headers, then anywhere
            for pos in rng.integers(0, min(span, len(data)), size=6):
                data[pos] = int(rng.integers(0, 256))
            try:
                out = preprocess_image(bytes(data), FAST, 2)
            except InvalidImage as exc:
                assert exc.extra["index"] == 2, fmt
            else:
                assert out.shape == (224, 224, 3), fmt


def test_too_small_images_are_refused(encode_image: Callable[..., bytes]) -> None:
    assert reason_of(encode_image(Image.new("RGB", (1, 1)), "PNG")) == "too_small"
    assert reason_of(encode_image(Image.new("RGB", (15, 400)), "JPEG")) == "too_small"
    assert preprocess_image(encode_image(Image.new("RGB", (16, 16)), "PNG"), FAST).shape == (
        224,
        224,
        3,
    )
    strict = PreprocessConfig(min_image_size=100)
    assert reason_of(encode_image(Image.new("RGB", (99, 400)), "PNG"), strict) == "too_small"


def test_decompression_bombs_are_refused_from_the_header(
    encode_image: Callable[..., bytes],
) -> None:
    bomb = png_header_only(20_000, 20_000)  # 400 Mpx declared in a ~100-byte file
    assert reason_of(bomb) == "too_many_pixels"
    # Beyond Pillow's own guard (2 x MAX_IMAGE_PIXELS) even a lax limit refuses it.
    assert reason_of(bomb, PreprocessConfig(max_image_pixels=10**12)) == "too_many_pixels"
    limit = PreprocessConfig(max_image_pixels=100_000)
    assert reason_of(encode_image(Image.new("RGB", (400, 300)), "PNG"), limit) == "too_many_pixels"
    assert preprocess_image(encode_image(Image.new("RGB", (300, 300)), "PNG"), limit).shape == (
        224,
        224,
        3,
    )


def test_not_an_image(to_base64: Callable[[bytes], str]) -> None:
    for raw in (b"hello, this is text", b"\x00" * 1000, b"\xff\xd8\xff\xe0garbage", b"GIF89a"):
        assert reason_of(raw) == "not_an_image"
    with pytest.raises(InvalidImage) as caught:
        preprocess_base64(to_base64(b"just some text"), FAST, 5)
    assert (caught.value.extra["index"], caught.value.extra["reason"]) == (5, "not_an_image")


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_unsupported_formats_are_named(encode_image: Callable[..., bytes], fmt: str) -> None:
    raw = encode_image(Image.new("RGB", (64, 64), (10, 20, 30)), fmt)
    with pytest.raises(InvalidImage) as caught:
        preprocess_image(raw, FAST, 1)
    assert caught.value.extra["reason"] == "unsupported_format"
    assert fmt in caught.value.message or fmt == "PPM"


# --- base64 -----------------------------------------------------------------------


def test_base64_forms(small_jpeg: bytes) -> None:
    plain = base64.b64encode(small_jpeg).decode()
    expected = preprocess_image(small_jpeg, FAST)
    forms = {
        "plain": plain,
        "data uri": "data:image/jpeg;base64," + plain,
        "data uri, no type": "data:;base64," + plain,
        "upper-case scheme": "DATA:image/jpeg;BASE64," + plain,
        "wrapped lines": base64.encodebytes(small_jpeg).decode(),
        "url-safe": base64.urlsafe_b64encode(small_jpeg).decode(),
        "no padding": plain.rstrip("="),
    }
    for name, data in forms.items():
        assert decode_base64(data) == small_jpeg, name
    np.testing.assert_array_equal(preprocess_base64(forms["data uri"], FAST), expected)


@pytest.mark.parametrize(
    "data",
    [
        "",
        "not base64 at all!",
        "QUJD$RA==",
        "QUJDR",  # a length no base64 string has
        "data:image/png,rawbytes",  # a data: URI that is not base64
        "data:image/png;base64",  # no comma
        "data:image/png;base64,",
        "ÄÖÜ",
        None,
        12345,
    ],
)
def test_invalid_base64(data: Any) -> None:
    with pytest.raises(InvalidImage) as caught:
        preprocess_base64(data, FAST, 4)
    error = caught.value
    assert (error.extra["index"], error.extra["reason"]) == (4, "invalid_base64")
    assert "image 4" in error.message and "base64" in error.message


# --- model input ------------------------------------------------------------------


def test_to_model_input_normalises_by_hand_computation() -> None:
    pixels = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    pixels[0, 1, 2] = (0, 128, 255)
    pixels[1, 3, 4] = (255, 1, 77)
    out = to_model_input(torch.from_numpy(pixels))
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32 and out.is_contiguous()
    for b, y, x in [(0, 1, 2), (1, 3, 4), (0, 0, 0)]:
        for c in range(3):
            expected = (pixels[b, y, x, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert abs(out[b, c, y, x].item() - expected) < 1e-6
    assert abs(out[0, 0, 1, 2].item() - (0.0 - 0.485) / 0.229) < 1e-6
    assert abs(out[0, 2, 1, 2].item() - (1.0 - 0.406) / 0.225) < 1e-6


def test_to_model_input_matches_the_reference_and_keeps_device_and_dtype(
    small_jpeg: bytes,
) -> None:
    crop = preprocess_image(small_jpeg, EXACT)
    ref = reference_preprocess(Image.open(io.BytesIO(small_jpeg)))
    ours = to_model_input(torch.from_numpy(crop[None].copy()))[0].numpy()
    # 1 grey level (rare, see the parity test) is 1 / 255 / std <= 0.0176 here.
    assert np.abs(ours - ref).max() < 0.018
    assert np.abs(ours - ref).mean() < 1e-4
    half = to_model_input(torch.from_numpy(crop[None].copy()), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    assert torch.allclose(half.float(), torch.from_numpy(ours[None]), atol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_model_input_runs_on_the_gpu(small_jpeg: bytes) -> None:
    crop = torch.from_numpy(preprocess_image(small_jpeg, FAST)[None].copy())
    on_gpu = to_model_input(crop.cuda(), torch.float16)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float16
    assert torch.allclose(on_gpu.float().cpu(), to_model_input(crop), atol=5e-3)


def test_to_model_input_rejects_wrong_input() -> None:
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# --- configuration and concurrency ---------------------------------------------------


def test_describe_is_json_and_names_the_choices() -> None:
    described = json.loads(json.dumps(FAST.describe()))
    assert described["crop_size"] == 224 and described["resize_shortest_edge"] == 256
    assert described["exif_transpose"] is True and described["fast"] is True
    assert described["mean"] == list(IMAGENET_MEAN) and described["std"] == list(IMAGENET_STD)
    assert "white" in described["alpha"]
    assert PreprocessConfig(fast=False).describe()["fast"] is False


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(crop_size=300)
    with pytest.raises(ValueError):
        PreprocessConfig(min_image_size=0)


def test_concurrent_calls_give_the_sequential_results(
    photo_jpegs: dict[str, bytes], phone_jpeg: bytes
) -> None:
    inputs = [*photo_jpegs.values(), phone_jpeg] * 3
    sequential = [preprocess_image(raw, FAST) for raw in inputs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda raw: preprocess_image(raw, FAST), inputs))
    for a, b in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(a, b)
