"""shared.clustering_client, sync and asyncio, against the running service."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from shared.clustering_client import (
    AsyncClusteringClient,
    ClusteringClient,
    ClusteringServiceError,
)
from tests.support.clustering import Clustering


def test_async_client_round_trip(
    service: Clustering, digits_vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits_vectors

    async def main() -> tuple[Any, ...]:
        async with AsyncClusteringClient(service.url) as client:
            ds = await client.create_dataset("async-client")
            added = await client.add_embeddings(
                ds.id,
                [f"a{i}" for i in range(150)],
                X[:150],
                [str(v) for v in y[:150]],
                batch_size=40,
            )
            job = await client.train(ds.id, "kmeans", model_name="async-model", n_clusters=5)
            states = [event.state async for event in client.events(job.id)]
            done = await client.wait(job.id)
            rows = await client.assignments("async-model", 1, page_size=33)
            predicted = await client.predict("async-model", embeddings=X[:3])
            return added, states, done, rows, predicted

    added, states, done, rows, predicted = asyncio.run(main())
    assert (added.added, added.count) == (150, 150)
    assert states[-1] == "succeeded" and done.state == "succeeded"
    assert len(rows) == 150
    by_id = {r.item_id: r.cluster for r in rows}
    assert [p.cluster for p in predicted.predictions] == [by_id["a0"], by_id["a1"], by_id["a2"]]


def test_sync_client_errors_and_idempotent_submission(
    service: Clustering, digits_vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    X, _ = digits_vectors
    with ClusteringClient(service.url) as client:
        with pytest.raises(ClusteringServiceError) as info:
            client.dataset("ds_missing")
        assert info.value.status == 404 and info.value.type == "not_found"
        ds = client.create_dataset("sync-client")
        client.add_embeddings(ds.id, [f"s{i}" for i in range(60)], X[:60])
        with pytest.raises(ClusteringServiceError) as info:
            client.train(ds.id, "kmeans", model_name="sync-model", params={"n_init": "x"})
        assert info.value.field == "params.n_init"
        first = client.train(
            ds.id, "kmeans", model_name="sync-model", n_clusters=3, idempotency_key="same"
        )
        again = client.train(
            ds.id, "kmeans", model_name="sync-model", n_clusters=3, idempotency_key="same"
        )
        assert again.id == first.id
        assert client.wait(first.id).state == "succeeded"
        assert client.missing_ids(ds.id, ["s1", "zz", "s2"]) == ["zz"]
