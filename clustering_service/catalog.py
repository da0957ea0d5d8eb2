"""What each algorithm accepts, read from the estimators themselves.

``GET /v1/algorithms`` lists it, and job requests are validated against it
before anything is queued: every hyper-parameter is a keyword of the
estimator's ``__init__`` (its annotation is the type, its default the
default), and every update parameter a keyword of its ``_update``. A pydantic
model built from those signatures checks types and names the bad field, and
the estimator's own ``_validate_params`` then checks values and ranges.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from clustering_service.algorithms import ALGORITHMS, ClusteringInputError, create
from clustering_service.algorithms.registry import get_class
from clustering_service.errors import InvalidRequest

#: constructor arguments the service sets itself (top-level request fields or callbacks)
RESERVED = frozenset({"n_clusters", "random_state", "device", "progress_callback", "cancel_check"})
#: update arguments every estimator takes (``BaseClusterer.update``)
COMMON_UPDATE: dict[str, tuple[Any, Any, str]] = {
    "max_epochs": (int | None, None, "Most training passes of the update (default: the model's)."),
    "max_centroid_shift": (
        float | None,
        None,
        "Largest distance any centre may move, in the model's clustering space.",
    ),
}


def _keywords(func: Any, skip: frozenset[str]) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(func)
    out: dict[str, tuple[Any, Any]] = {}
    for p in inspect.signature(func).parameters.values():
        if p.name in skip or p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            continue
        out[p.name] = (hints.get(p.name, Any), p.default)
    return out


def _strict_model(name: str, fields: dict[str, tuple[Any, Any]]) -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload]
        name, __config__=ConfigDict(extra="forbid", strict=False), **fields
    )


@functools.cache
def _train_model(algorithm: str) -> type[BaseModel]:
    return _strict_model(f"{algorithm}_params", _keywords(get_class(algorithm).__init__, RESERVED))


@functools.cache
def _update_model(algorithm: str) -> type[BaseModel]:
    extra = _keywords(get_class(algorithm)._update, frozenset({"X", *COMMON_UPDATE}))
    common = {k: (t, d) for k, (t, d, _) in COMMON_UPDATE.items()}
    return _strict_model(f"{algorithm}_update_params", {**common, **extra})


def _parameter(name: str, annotation: Any, default: Any, text: str | None = None) -> dict:
    schema = TypeAdapter(annotation).json_schema()
    return {"name": name, "schema": schema, "default": default, "description": text}


def describe(algorithm: str) -> dict[str, Any]:
    """Name, one-line description, and each parameter's type (JSON schema) and default."""
    klass = get_class(algorithm)
    doc = inspect.getdoc(klass) or ""
    parameters = [
        _parameter(name, annotation, default)
        for name, (annotation, default) in _keywords(klass.__init__, RESERVED).items()
    ]
    extra = _keywords(klass._update, frozenset({"X", *COMMON_UPDATE}))
    update_parameters = [
        _parameter(name, annotation, default, text)
        for name, (annotation, default, text) in COMMON_UPDATE.items()
    ] + [_parameter(name, annotation, default) for name, (annotation, default) in extra.items()]
    return {
        "name": algorithm,
        "description": doc.split("\n\n", 1)[0].replace("\n", " "),
        "parameters": parameters,
        "update_parameters": update_parameters,
        "supports_auto_k": True,
    }


def describe_all() -> list[dict[str, Any]]:
    return [describe(name) for name in ALGORITHMS]


def _check(model: type[BaseModel], params: dict[str, Any], prefix: str) -> dict[str, Any]:
    try:
        return model.model_validate(params).model_dump(exclude_unset=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        field = f"{prefix}.{loc}" if loc else prefix
        if first["type"] == "extra_forbidden":
            valid = sorted(model.model_fields)
            message = f"{field}: unknown parameter; valid: {', '.join(valid)}"
        else:
            message = f"{field}: {first['msg']}"
        raise InvalidRequest(message, field=field) from None


def validate_train(
    algorithm: str, n_clusters: int | None, seed: int, params: dict[str, Any]
) -> dict[str, Any]:
    """Check a train request's algorithm and params; returns the params as validated.

    Raises InvalidRequest naming the field (``algorithm``, ``params.<name>``).
    """
    if algorithm not in ALGORITHMS:
        raise InvalidRequest(
            f"algorithm: unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}",
            field="algorithm",
        )
    checked = _check(_train_model(algorithm), params, "params")
    try:
        create(algorithm, n_clusters=n_clusters, random_state=seed, **checked)._validate_params()
    except ClusteringInputError as exc:
        raise InvalidRequest(f"params: {exc}", field=_field_in(str(exc), checked)) from None
    return checked


def validate_update(algorithm: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check an update request's params for a model of ``algorithm``."""
    checked = _check(_update_model(algorithm), params, "params")
    for key in ("max_epochs", "max_centroid_shift"):
        value = checked.get(key)
        if value is not None and value < 0:
            raise InvalidRequest(f"params.{key}: must be >= 0, got {value}", field=f"params.{key}")
    return checked


def _field_in(message: str, params: dict[str, Any]) -> str:
    """The parameter an estimator's error message names (``params`` when none)."""
    for name in sorted(params, key=len, reverse=True):
        if message.startswith(name) or f" {name} " in message or f"{name}=" in message:
            return f"params.{name}"
    return "n_clusters" if "n_clusters" in message else "params"
