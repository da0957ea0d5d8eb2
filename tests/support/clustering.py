"""Helpers for the clustering service's HTTP tests: a service process with an
HTTP client and API shortcuts, fast algorithm parameters, vector items."""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.processes import ServiceProcess

#: short schedules per algorithm (keys an algorithm does not accept are dropped)
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "kmeans": {"n_init": 2},
    "dec": {"hidden_dims": [32, 32], "latent_dim": 5, "pretrain_epochs": 3, "cluster_epochs": 2},
    "deepcluster": {"epochs": 2, "trunk_dim": 16, "hidden_dim": 32, "pca_dim": None},
    "odc": {"hidden_dim": 32, "feature_dim": 16, "n_epochs": 2, "warmup_epochs": 0},
    "neighbors": {
        "n_neighbors": 5,
        "hidden_dim": 32,
        "proj_dim": 16,
        "n_heads": 2,
        "pretrain_epochs": 10,
        "epochs": 10,
        "distill_epochs": 10,
        "self_label_epochs": 5,
    },
}


def fast_params(algorithm: str) -> dict[str, Any]:
    from clustering_service.algorithms.registry import get_class

    valid = set(get_class(algorithm)._param_names())
    return {k: v for k, v in FAST_PARAMS.get(algorithm, {}).items() if k in valid}


def b64_vector(row: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()


def vector_items(X: np.ndarray, prefix: str = "v", labels: Any = None) -> list[dict[str, Any]]:
    """Items with base64 float32 embeddings (and labels when given)."""
    items = []
    for i, row in enumerate(X):
        item: dict[str, Any] = {"id": f"{prefix}{i}", "embedding": b64_vector(row)}
        if labels is not None:
            item["label"] = str(labels[i])
        items.append(item)
    return items


class Clustering(ServiceProcess):
    """``python -m clustering_service [command]`` with test settings and an HTTP client."""

    def __init__(
        self,
        embedding_url: str,
        *,
        data_dir: Path,
        database_url: str | None = None,
        command: str = "serve",
        env: dict[str, str] | None = None,
    ) -> None:
        settings = {
            "CLUSTERING_EMBEDDING_URL": embedding_url,
            "CLUSTERING_DATA_DIR": str(data_dir),
            "CLUSTERING_WORKER_HEARTBEAT_SECONDS": "0.5",
            "CLUSTERING_WORKER_STALLED_SECONDS": "3",
            "CLUSTERING_PROGRESS_INTERVAL_SECONDS": "0.05",
            "CLUSTERING_EMBEDDING_RETRIES": "1",
            "CLUSTERING_EMBEDDING_TIMEOUT": "20",
            "CLUSTERING_ACCESS_LOG": "false",
            "CLUSTERING_DEVICE": "cpu",
            **({"CLUSTERING_DATABASE_URL": database_url} if database_url else {}),
            **(env or {}),
        }
        self.data_dir = data_dir
        args = () if command == "serve" else (command,)
        super().__init__(
            "clustering_service",
            *args,
            env=settings,
            env_prefix="CLUSTERING_",
            listen=command == "serve",
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def restart(self) -> Clustering:
        self.stop()
        return self.start().wait_ready()  # type: ignore[return-value]

    def close(self) -> None:
        super().close()
        self.client.close()

    # -- API helpers ---------------------------------------------------------------
    def dataset(self, name: str | None = None) -> str:
        r = self.client.post("/v1/datasets", json={"name": name or f"ds-{uuid.uuid4().hex[:8]}"})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def add(self, dataset_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.client.post(f"/v1/datasets/{dataset_id}/items", json={"items": items})
        assert r.status_code == 200, r.text
        return r.json()

    def train(self, dataset_id: str, algorithm: str, model: str, **fields: Any) -> dict:
        body = {
            "type": "train",
            "dataset_id": dataset_id,
            "algorithm": algorithm,
            "model_name": model,
            "params": fast_params(algorithm),
            **fields,
        }
        r = self.client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s:\n"
                             f"{self.output()[-4000:]}")  # fmt: skip
