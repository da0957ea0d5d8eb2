"""Name -> estimator class. Modules are imported on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from clustering_service.algorithms.exceptions import ClusteringInputError

if TYPE_CHECKING:
    from clustering_service.algorithms.base import BaseClusterer

_CLASSES: dict[str, tuple[str, str]] = {
    "kmeans": ("clustering_service.algorithms.kmeans", "KMeansClusterer"),
    "dec": ("clustering_service.algorithms.dec", "DEC"),
    "deepcluster": ("clustering_service.algorithms.deepcluster", "DeepCluster"),
    "odc": ("clustering_service.algorithms.odc", "ODC"),
    "neighbors": ("clustering_service.algorithms.neighbors", "NeighborClusterer"),
}

#: Names accepted by :func:`create`.
ALGORITHMS: tuple[str, ...] = tuple(_CLASSES)


def get_class(name: str) -> type[BaseClusterer]:
    """The estimator class registered under ``name``."""
    try:
        module_name, class_name = _CLASSES[name]
    except KeyError:
        raise ClusteringInputError(
            f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)
