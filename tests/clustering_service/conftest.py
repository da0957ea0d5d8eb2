"""Fixtures for the clustering tests: small real data sets.

The repository root goes on ``sys.path`` so tests can import ``bench.datasets``
(the same data the benchmarks use) however pytest is started; with
``--import-mode=importlib`` the rootdir is not added automatically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(scope="session")
def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits scaled to [0, 1]: X float32 (1797, 64), y int64."""
    from bench.datasets import digits

    return digits()


@pytest.fixture(scope="session")
def small_digits(digits_data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 300-row subset of digits with classes 0-4 only (5 clusters): fast fits."""
    X, y = digits_data
    keep = np.flatnonzero(y < 5)
    rows = np.sort(np.random.default_rng(0).choice(keep, 300, replace=False))
    return X[rows], y[rows]
