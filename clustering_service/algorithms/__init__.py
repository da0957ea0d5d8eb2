"""Pure clustering algorithms (no HTTP, no database).

>>> from clustering_service.algorithms import create
>>> est = create("dec", n_clusters=10, random_state=0).fit(X)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from clustering_service.algorithms.base import BaseClusterer, Progress
from clustering_service.algorithms.exceptions import (
    ClusteringCancelled,
    ClusteringInputError,
    ModelFormatError,
    NotFittedError,
)
from clustering_service.algorithms.registry import ALGORITHMS, get_class

__all__ = [
    "ALGORITHMS",
    "BaseClusterer",
    "ClusteringCancelled",
    "ClusteringInputError",
    "ModelFormatError",
    "NotFittedError",
    "Progress",
    "create",
    "load",
]


def create(
    name: str, n_clusters: int | None = 8, random_state: int = 0, **params: Any
) -> BaseClusterer:
    """An unfitted estimator of algorithm ``name`` (one of :data:`ALGORITHMS`).

    ``n_clusters=None`` asks for an automatic choice of k at fit time.
    Unknown parameters raise :class:`ClusteringInputError` naming them.
    """
    klass = get_class(name)
    valid = set(klass._param_names())
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ClusteringInputError(
            f"unknown parameter(s) {unknown} for {name}; valid: {sorted(valid)}"
        )
    return klass(n_clusters=n_clusters, random_state=random_state, **params)


def load(directory: str, device: str = "cpu") -> BaseClusterer:
    """Load any saved estimator (dispatches on the saved algorithm name)."""
    return BaseClusterer.load(directory, device=device)
