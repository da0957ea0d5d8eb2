"""One clustering service for the dashboard's tests, started once per session: an
API key set, a dataset of real photographs (crops of the scikit-learn and
scikit-image sample photos, embedded by the real embedding service), a model
trained on it (version 1), an update after items were deleted and added
(version 2), and a version trained afresh with another k (version 3, no parent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.clustering import Clustering
from tests.support.processes import ServiceProcess, private_dir, stop_postmaster

API_KEY = "dashboard-test-key"
MODEL = "photos"
PHOTOS = ("china", "flower", "astronaut", "coffee", "chelsea", "rocket")
#: crops per photo in version 1; the others come with the update
FIRST_CROPS = 4


def crops(photo: np.ndarray, side: int = 192) -> list[Image.Image]:
    """Overlapping crops of a photo: its corners and centre at 65% of its size, then at
    45%; shrunk to ``side`` px."""
    height, width = photo.shape[:2]
    out = []
    for scale in (0.65, 0.45):
        h, w = int(height * scale), int(width * scale)
        corners = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w)]
        corners.append(((height - h) // 2, (width - w) // 2))
        for top, left in corners:
            image = Image.fromarray(photo[top : top + h, left : left + w])
            image.thumbnail((side, side), Image.Resampling.BICUBIC)
            out.append(image)
    return out


@dataclass
class DashboardData:
    """The service and what the fixture stored in it."""

    service: Clustering
    dataset_id: str
    #: item ids of version 1, deleted before the update / added for it
    removed: list[str]
    added: list[str]
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.service.url


@pytest.fixture(scope="session")
def dashboard_data(
    embedding_service: ServiceProcess,
    photo_arrays: dict[str, np.ndarray],
    encode_image: Callable[..., bytes],
    to_base64: Callable[[bytes], str],
) -> Iterator[DashboardData]:
    data_dir: Path = private_dir()
    service = Clustering(
        embedding_service.url, data_dir=data_dir, env={"CLUSTERING_API_KEY": API_KEY}
    )
    service.client.headers["Authorization"] = f"Bearer {API_KEY}"
    try:
        service.start().wait_ready(120)
        c = service.client
        items = {
            name: [
                {
                    "id": f"photos/{name}/{i}.jpg",
                    "image": to_base64(encode_image(image)),
                    "label": name,
                }
                for i, image in enumerate(crops(photo_arrays[name]))
            ]
            for name in PHOTOS
        }
        dataset = service.dataset("photos")
        service.add(dataset, [item for name in PHOTOS for item in items[name][:FIRST_CROPS]])
        job = service.train(dataset, "kmeans", MODEL, n_clusters=len(PHOTOS))
        assert service.wait_job(job["id"])["state"] == "succeeded"

        removed = [items["china"][0]["id"], items["rocket"][1]["id"]]
        r = c.request("DELETE", f"/v1/datasets/{dataset}/items", json={"ids": removed})
        assert r.status_code == 200, r.text
        new = [item for name in PHOTOS for item in items[name][FIRST_CROPS:]]
        service.add(dataset, new)
        r = c.post(f"/v1/models/{MODEL}/update", json={"params": {"max_epochs": 5}})
        assert r.status_code == 202, r.text
        assert service.wait_job(r.json()["id"])["state"] == "succeeded"
        job = service.train(dataset, "kmeans", MODEL, n_clusters=len(PHOTOS) - 2)
        assert service.wait_job(job["id"])["state"] == "succeeded"
        for version in (1, 2):
            r = c.put(f"/v1/models/{MODEL}/aliases/production", json={"version": version})
            assert r.status_code == 200, r.text

        data = DashboardData(service, dataset, removed, [item["id"] for item in new])
        for version in (1, 2, 3):
            data.versions[version] = c.get(f"/v1/models/{MODEL}/versions/{version}").json()
        yield data
    finally:
        service.close()
        stop_postmaster(data_dir / "postgres")
