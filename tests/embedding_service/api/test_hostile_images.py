"""The hostile-image corpus (tests/support/hostile.py) through the real HTTP API.

Each case, alone and in the middle of a batch of valid images, gets either a
422 ``invalid_image`` naming its position, or the embedding of the same picture
decoded correctly (cosine >= 0.999). Decompression bombs are refused before
their pixels are decoded (the process's peak memory does not move), and the
service keeps answering valid requests, ``/health`` and ``/ready``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.support.hostile import Case, corpus, png_png

#: embeddings of the same picture must agree this closely
MIN_COSINE = 0.999
#: peak resident memory the whole corpus may add (one 60000 x 60000 RGB bomb is 10.8 GB)
MAX_PEAK_GROWTH = 200 * 2**20


@pytest.fixture(scope="module")
def cases(photo_arrays: dict[str, np.ndarray]) -> list[Case]:
    return corpus(photo_arrays["coffee"])


@pytest.fixture(scope="module")
def http(embedding_service: Any) -> Any:
    with httpx.Client(base_url=embedding_service.url, timeout=60) as client:
        yield client


def embed(http: httpx.Client, images: list[str]) -> httpx.Response:
    # Mean pooling: on random:tiny the CLS vector barely sees the pixels (a photo and the
    # same photo upside down are at cosine 0.9995); the patch mean tells them apart.
    return http.post("/v1/embeddings", json={"images": images, "pooling": "mean"})


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], np.float32)


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def check(case: Case, response: httpx.Response, index: int, expected: np.ndarray | None) -> str:
    """'' when ``response`` is right for ``case`` at position ``index``, else why not."""
    if case.refused:
        if response.status_code != 422:
            return f"{case.name}: expected 422, got {response.status_code} {response.text[:200]}"
        error = response.json()["error"]
        if error["type"] != "invalid_image" or error.get("index") != index:
            return f"{case.name}: error does not name image {index}: {error}"
        if f"image {index}" not in error["message"]:
            return f"{case.name}: message does not name image {index}: {error['message']}"
        return ""
    if response.status_code != 200:
        return f"{case.name}: expected 200, got {response.status_code} {response.text[:200]}"
    got = np.asarray(response.json()["embeddings"][index], np.float32)
    cosine = float(got @ expected)  # both L2-normalised
    return "" if cosine >= MIN_COSINE else f"{case.name}: cosine {cosine:.5f} < {MIN_COSINE}"


def test_each_hostile_image_is_refused_by_index_or_embedded_correctly(
    http: httpx.Client, embedding_service: Any, cases: list[Case], photos_b64: list[str]
) -> None:
    assert embedding_service.process is not None
    pid = embedding_service.process.pid
    accepted = [c for c in cases if not c.refused]
    refs = dict(
        zip(
            [c.name for c in accepted],
            vectors(embed(http, [png_png(c.expected) for c in accepted])),  # type: ignore[arg-type]
            strict=True,
        )
    )
    valid = vectors(embed(http, photos_b64[:2]))
    peak_before = peak_rss(pid)

    failures = []
    for case in cases:
        alone = embed(http, [case.payload])
        failures.append(check(case, alone, 0, refs.get(case.name)))
        batch = embed(http, [photos_b64[0], case.payload, photos_b64[1]])
        failures.append(check(case, batch, 1, refs.get(case.name)))
        if batch.status_code == 200:
            got = np.asarray(batch.json()["embeddings"], np.float32)[[0, 2]]
            if not (np.sum(got * valid, axis=1) >= MIN_COSINE).all():
                failures.append(f"{case.name}: the valid images around it changed")
        assert http.get("/health").status_code == 200, case.name
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)

    growth = peak_rss(pid) - peak_before
    assert growth < MAX_PEAK_GROWTH, f"peak memory grew by {growth / 2**20:.0f} MiB"
    after = vectors(embed(http, photos_b64[:2]))
    assert (np.sum(after * valid, axis=1) >= MIN_COSINE).all()
    assert http.get("/ready").status_code == 200
    assert http.get("/health").json()["status"] == "ok"


def test_the_corpus_tells_a_wrong_decoding_from_a_right_one(
    http: httpx.Client, cases: list[Case]
) -> None:
    """The cosine bound discriminates on this model: the stored (unrotated) pixels of an
    EXIF-rotated photo, or 16-bit data clipped to white, would fail it."""
    by_name = {c.name: c for c in cases}
    upright = by_name["exif_orientation_3"].expected
    assert upright is not None
    wrong = upright.transpose(Image.Transpose.ROTATE_180)
    grey = ImageOps.grayscale(upright)
    white = Image.new("RGB", grey.size, (255, 255, 255))
    got = vectors(embed(http, [png_png(upright), png_png(wrong), png_png(grey), png_png(white)]))
    assert got[0] @ got[1] < MIN_COSINE
    assert got[2] @ got[3] < MIN_COSINE
