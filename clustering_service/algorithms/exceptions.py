"""Exceptions raised by the clustering algorithms.

All bad-input errors derive from :class:`ClusteringInputError`, itself a
``ValueError``, so callers may catch either.
"""


class ClusteringInputError(ValueError):
    """The data or parameters given to an estimator are unusable (message says why)."""


class NotFittedError(ClusteringInputError):
    """A method that needs a fitted estimator was called before ``fit``/``load``."""


class ModelFormatError(ClusteringInputError):
    """A save directory is missing, corrupted, or was not written by this library."""


class ClusteringCancelled(RuntimeError):
    """Raised inside ``fit``/``update`` when the caller's cancel check returns True."""
