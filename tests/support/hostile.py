"""A corpus of hostile images, generated with Pillow (and a few hand-built headers).

Every case is either refused (a 4xx naming the image is the right answer) or
accepted, and then its embedding must equal the embedding of ``expected``: the
same picture decoded correctly (upright for an EXIF-rotated photo, the RGB
conversion of CMYK, 16-bit or palette data, the first frame of an animation,
transparency composited on white), sent as a plain RGB PNG.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: formats every image endpoint accepts (tests/conftest.py IMAGE_FORMATS)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: side of the decompression bombs: 3.6 Gpx, 10.8 GB as RGB, in a few hundred bytes
BOMB_SIDE = 60_000


@dataclass(frozen=True)
class Case:
    """One hostile input: ``payload`` is what the client sends (base64 or a data: URI).

    ``expected`` is None when the image must be refused, else the correctly decoded
    RGB picture whose embedding the service must return.
    """

    name: str
    payload: str
    expected: Image.Image | None

    @property
    def refused(self) -> bool:
        return self.expected is None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def png_png(img: Image.Image) -> str:
    """``img`` as base64 RGB PNG: the well-formed twin a hostile case is compared to."""
    return b64(encode(img.convert("RGB"), "PNG"))


# --- hand-built headers ------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels; the data is a few rows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * (3 * 1024 + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def gif_bomb(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF with logical screen ``screen`` and one frame of size ``frame`` (LZW data of a
    few pixels). A frame larger than its screen is legal and grows the image in Pillow."""
    palette = bytes(range(6))  # 2 colours
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", *screen, 0x80, 0, 0)
        + palette
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, *frame, 0)
        + b"\x02\x02\x44\x01\x00"  # min code size 2, one sub-block: clear, 0, end
        + b"\x3b"
    )


def bmp_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A 24-bit BMP whose info header claims ``width`` x ``height``; 64 bytes of pixels."""
    pixels = b"\x00" * 64
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    header = struct.pack("<2sIHHI", b"BM", 14 + 40 + len(pixels), 0, 0, 54)
    return header + info + pixels


def jpeg_bomb(real: bytes, width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """``real`` (a baseline JPEG) with its frame header (SOF0) claiming ``width`` x ``height``."""
    sof = real.index(b"\xff\xc0")
    return real[: sof + 5] + struct.pack(">HH", height, width) + real[sof + 9 :]


def tiff_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A little-endian greyscale TIFF whose tags claim ``width`` x ``height``, one strip
    of 16 bytes."""
    entries = [
        (256, 4, 1, width),  # ImageWidth (LONG)
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),  # StripOffsets: right after the IFD
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + b"\x00" * 16


def webp_canvas_bomb(small_webp: bytes, side: int = 16_383) -> bytes:
    """A lossless WebP frame inside an extended (VP8X) file whose canvas is ``side`` px
    square (268 Mpx): the largest canvas the format allows."""
    assert small_webp[12:16] == b"VP8L", "expected a lossless WebP"
    frame = small_webp[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (side - 1).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- the corpus ----------------------------------------------------------------------


#: EXIF orientation -> the transpose that shows the stored pixels upright
_UPRIGHT = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_270,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _decoded(raw: bytes) -> Image.Image:
    """What Pillow makes of ``raw`` (first frame), as RGB: the reference for lossy files."""
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return img.convert("RGB")


def corpus(photo: np.ndarray) -> list[Case]:
    """Every hostile case, built from ``photo`` (a uint8 RGB array, at least 300 x 300)."""
    rgb = Image.fromarray(photo).resize((320, 240), Image.Resampling.BICUBIC)
    files = {
        fmt: encode(rgb if fmt != "GIF" else rgb.convert("P"), fmt, **_save_args(fmt))
        for fmt in FORMATS
    }
    cases: list[Case] = []

    def refuse(name: str, data: bytes | str) -> None:
        cases.append(Case(name, data if isinstance(data, str) else b64(data), None))

    def accept(name: str, data: bytes | str, expected: Image.Image) -> None:
        payload = data if isinstance(data, str) else b64(data)
        cases.append(Case(name, payload, expected.convert("RGB")))

    # Truncated files of every format: half the file, then the header alone.
    for fmt, raw in files.items():
        refuse(f"truncated_half_{fmt.lower()}", raw[: len(raw) // 2])
        refuse(f"truncated_header_{fmt.lower()}", raw[:40])

    # Wrong magic bytes.
    refuse("png_with_jpeg_magic", b"\xff\xd8\xff\xe0" + files["PNG"][4:])
    refuse("jpeg_with_zeroed_magic", b"\x00\x00\x00\x00" + files["JPEG"][4:])
    refuse("gif_with_bad_version", b"GIF00a" + files["GIF"][6:])
    refuse("bmp_with_png_magic", b"\x89PNG\r\n\x1a\n" + files["BMP"][8:])
    refuse("text_file", b"hello, I am a text file and not an image at all")
    refuse("unsupported_ppm", encode(rgb, "PPM"))

    # Zero bytes and empty payloads.
    refuse("empty_string", "")
    refuse("zero_bytes_1000", b"\x00" * 1000)
    refuse("data_uri_empty", "data:image/png;base64,")

    # Huge dimensions in tiny files (decompression bombs).
    refuse("png_bomb_60000", png_bomb())
    # 100 Mpx: under Pillow's own refusal (2 x Image.MAX_IMAGE_PIXELS), over the service's
    refuse("png_bomb_100mpx", png_bomb(10_000, 10_000))
    refuse("gif_bomb_screen_60000", gif_bomb((BOMB_SIDE, BOMB_SIDE), (2, 2)))
    refuse("gif_bomb_frame_larger_than_screen", gif_bomb((64, 64), (BOMB_SIDE, BOMB_SIDE)))
    refuse("bmp_bomb_60000", bmp_bomb())
    refuse("jpeg_bomb_60000", jpeg_bomb(files["JPEG"]))
    refuse("tiff_bomb_60000", tiff_bomb())
    refuse("webp_canvas_bomb_16383", webp_canvas_bomb(files["WEBP"]))
    refuse("one_pixel_png", encode(Image.new("RGB", (1, 1)), "PNG"))

    # Animated: the first frame.
    black = Image.new("RGB", rgb.size)
    for fmt in ("GIF", "PNG", "WEBP"):
        raw = encode(rgb, fmt, save_all=True, append_images=[black], duration=100, loop=0,
                     **_save_args(fmt))  # fmt: skip
        with Image.open(io.BytesIO(raw)) as img:
            assert getattr(img, "n_frames", 1) == 2, fmt
        accept(f"animated_{fmt.lower()}", raw, _decoded(raw) if fmt == "GIF" else rgb)

    # 16-bit greyscale: scaled to 8 bits (x / 257), not clipped to white.
    grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    for fmt in ("PNG", "TIFF"):
        raw = encode(Image.fromarray(grey), fmt)
        with Image.open(io.BytesIO(raw)) as img:
            assert img.mode.startswith("I;16"), img.mode
        accept(f"grey16_{fmt.lower()}", raw, rgb.convert("L"))

    # CMYK: the RGB conversion.
    cmyk = rgb.convert("CMYK")
    accept("cmyk_tiff", encode(cmyk, "TIFF"), cmyk.convert("RGB"))
    raw = encode(cmyk, "JPEG", quality=95)
    accept("cmyk_jpeg", raw, _decoded(raw))

    # Palette with transparency: transparent pixels composited on white.
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    for fmt in ("PNG", "GIF"):
        raw = encode(palette, fmt, transparency=0)
        with Image.open(io.BytesIO(raw)) as img:
            on_white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            on_white.alpha_composite(img.convert("RGBA"))
        accept(f"palette_transparent_{fmt.lower()}", raw, on_white)

    # EXIF-rotated: the upright picture (orientation 6: stored turned 90 degrees left).
    for value, stored in (
        (3, rgb.transpose(Image.Transpose.ROTATE_180)),
        (6, rgb.transpose(Image.Transpose.ROTATE_90)),
        (8, rgb.transpose(Image.Transpose.ROTATE_270)),
    ):
        raw = encode(stored, "JPEG", quality=95, exif=_exif_orientation(value))
        upright = _decoded(raw).transpose(_UPRIGHT[value])
        assert upright.size == rgb.size
        accept(f"exif_orientation_{value}", raw, upright)
    raw = encode(rgb, "JPEG", quality=95, exif=_exif_orientation(42))
    accept("exif_orientation_invalid_value", raw, _decoded(raw))

    # A valid image inside a data: URI with a wrong media type: the bytes decide.
    accept("data_uri_says_gif_holds_png", "data:image/gif;base64," + b64(files["PNG"]), rgb)
    accept("data_uri_says_text_holds_png", "data:text/plain;base64," + b64(files["PNG"]), rgb)
    refuse("data_uri_not_base64", "data:image/png,not-base64-at-all")
    return cases


def _save_args(fmt: str) -> dict[str, object]:
    return {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
