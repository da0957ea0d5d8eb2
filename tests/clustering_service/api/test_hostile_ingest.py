"""The hostile-image corpus (tests/support/hostile.py) through the clustering service's
image ingest: each case between two valid images is either refused with a 422 naming
the item (and then nothing of the request is stored: count, revision and the valid
neighbours' ids unchanged), or stored with the other two, with a thumbnail that
shows the picture (upright, 16-bit scaled, not clipped to white). The embeddings themselves
are checked against correct decodings in tests/embedding_service/api/test_hostile_images.py.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from tests.support.clustering import Clustering
from tests.support.hostile import Case, corpus

#: mean absolute difference (grey levels) between a thumbnail and the picture, shrunk
MAX_THUMBNAIL_DIFF = 12.0


def thumbnail_diff(thumbnail: bytes, case: Case) -> float:
    assert case.expected is not None
    got = Image.open(io.BytesIO(thumbnail)).convert("RGB")
    want = case.expected.copy()
    want.thumbnail(got.size, Image.Resampling.LANCZOS)
    if want.size != got.size:
        return float("inf")
    return float(np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).mean())


def test_hostile_images_are_refused_by_item_or_stored_whole(
    service: Clustering, photo_jpegs: dict[str, bytes], photo_arrays: dict[str, np.ndarray],
    to_base64: Any,
) -> None:  # fmt: skip
    c = service.client
    dataset = service.dataset()
    good = [to_base64(photo_jpegs[name]) for name in ("china", "flower")]
    service.add(dataset, [{"id": "seed", "image": good[0]}])
    url = f"/v1/datasets/{dataset}/items"

    failures = []
    for case in corpus(photo_arrays["coffee"]):
        ids = [f"{case.name}/before", case.name, f"{case.name}/after"]
        items = [
            {"id": ids[0], "image": good[0]},
            {"id": ids[1], "image": case.payload},
            {"id": ids[2], "image": good[1]},
        ]
        before = c.get(f"/v1/datasets/{dataset}").json()
        response = c.post(url, json={"items": items})
        after = c.get(f"/v1/datasets/{dataset}").json()
        present = c.post(f"{url}/lookup", json={"ids": ids}).json()["present"]
        if case.refused:
            error = response.json().get("error", {})
            if response.status_code != 422 or error.get("type") != "invalid_image":
                failures.append(f"{case.name}: {response.status_code} {response.text[:300]}")
            elif (error.get("index"), error.get("field")) != (1, "items[1].image"):
                failures.append(f"{case.name}: the error does not name items[1]: {error}")
            elif repr(case.name) not in error["message"]:
                failures.append(f"{case.name}: the message does not name the item: {error}")
            if (after["count"], after["revision"], present) != (
                before["count"], before["revision"], []
            ):  # fmt: skip
                failures.append(f"{case.name}: half-stored: {before} -> {after}, {present}")
        else:
            if response.status_code != 200 or response.json()["added"] != 3:
                failures.append(f"{case.name}: {response.status_code} {response.text[:300]}")
            if after["count"] != before["count"] + 3 or present != ids:
                failures.append(f"{case.name}: not all stored: {before} -> {after}, {present}")
            thumbnail = c.get(f"{url}/{case.name}/thumbnail")
            diff = thumbnail_diff(thumbnail.content, case) if thumbnail.status_code == 200 else -1
            if not 0 <= diff <= MAX_THUMBNAIL_DIFF:
                failures.append(f"{case.name}: thumbnail {thumbnail.status_code}, diff {diff}")
    assert not failures, "\n".join(failures)

    assert service.add(dataset, [{"id": "last", "image": good[1]}])["added"] == 1
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 200, c.get("/ready").text
