"""Prometheus metrics of one clustering-service process.

Request latencies are observed where they happen; jobs by state and job
durations are read from the database at scrape time, so every API process
reports the same cluster-wide numbers whichever worker ran the jobs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_JOB_SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class ServiceMetrics:
    """The metrics the clustering service exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.failures = Counter(
            "clustering_request_failures",
            "Failed /v1 requests by error type.",
            ["type"],
            registry=r,
        )
        self.items_ingested = Counter(
            "clustering_items_ingested", "Items stored by ingest requests.", registry=r
        )
        self.ingest_seconds = Histogram(
            "clustering_ingest_seconds",
            "Duration of item ingest requests (embedding included).",
            ["source"],
            buckets=_SECONDS,
            registry=r,
        )
        self.predict_seconds = Histogram(
            "clustering_predict_seconds",
            "Duration of predict requests (embedding included).",
            ["source"],
            buckets=_SECONDS,
            registry=r,
        )

    def track_jobs(self, engine: Engine) -> None:
        """Also export jobs by state and job durations, read from ``engine`` at scrape time."""
        self.registry.register(_JobCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _JobCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        states = GaugeMetricFamily(
            "clustering_jobs", "Jobs by type and state (all processes).", labels=["type", "state"]
        )
        durations = HistogramMetricFamily(
            "clustering_job_duration_seconds",
            "Run time of finished jobs, start to end (all processes).",
            labels=["type", "state"],
        )
        try:
            with self.engine.connect() as conn:
                for type_, state, n in conn.execute(
                    text("SELECT type, state, count(*) FROM jobs GROUP BY type, state")
                ):
                    states.add_metric([type_, state], n)
                buckets = ", ".join(f"count(*) FILTER (WHERE d <= {b})" for b in _JOB_SECONDS)
                rows = conn.execute(
                    text(
                        f"SELECT type, state, {buckets}, count(*), coalesce(sum(d), 0) FROM "
                        "(SELECT type, state, extract(epoch FROM finished_at - started_at) AS d "
                        "FROM jobs WHERE finished_at IS NOT NULL AND started_at IS NOT NULL) t "
                        "GROUP BY type, state"
                    )
                ).all()
        except Exception:  # the database is down: /ready says so; metrics stay partial
            return
        for row in rows:
            type_, state, *counts = row
            total, total_seconds = counts[-2], counts[-1]
            cumulative = [(str(b), c) for b, c in zip(_JOB_SECONDS, counts[:-2], strict=True)]
            cumulative.append(("+Inf", total))
            durations.add_metric([type_, state], cumulative, float(total_seconds))
        yield states
        yield durations
