"""OpenAPI documentation both services share: error responses and their headers.

Every route lists the errors it can give with :func:`error_responses` (the
body is always :class:`shared.schemas.ErrorResponse`). :func:`finish_openapi`
corrects two things in FastAPI's generated document: the 422 it adds on its
own is given our ``invalid_request`` body (:mod:`shared.server`), never
FastAPI's ``detail`` list, and the request schemas routes declare by hand
(``openapi_extra``, for bodies parsed straight from bytes) have their nested
models (``#/$defs/...``) moved to ``#/components/schemas``, where references
in an OpenAPI document resolve. ``tests/test_api_fuzz.py`` holds the services
to the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from shared.schemas import ErrorResponse

#: what every service means by each status (a service may word its own)
ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "unauthorized: missing or wrong API key",
    404: "not_found: the named resource does not exist",
    409: "conflict: the request contradicts what is stored",
    413: "payload_too_large: the body is over the limit (refused unread)",
    422: "invalid_request (with field)",
    429: "overloaded: the queue is full (Retry-After)",
    502: "an upstream service refused the request",
    503: "not_ready (Retry-After)",
}

# The retryable errors always carry Retry-After (shared.errors._RetryLater and the
# clustering service's embedding_service_unavailable).
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": r"^\d+$"},
    }
}
_HEADERS_BY_STATUS = {429: _RETRY_AFTER, 503: _RETRY_AFTER}

#: the content of a Prometheus ``/metrics`` response
PROMETHEUS_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


def error_responses(
    codes: tuple[int, ...], descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that can answer with these error ``codes``."""
    words = {**ERROR_DESCRIPTIONS, **(descriptions or {})}
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": words[code]}
        if code in _HEADERS_BY_STATUS:
            entry["headers"] = _HEADERS_BY_STATUS[code]
        out[code] = entry
    return out


def finish_openapi(app: FastAPI, description: str = ERROR_DESCRIPTIONS[422]) -> None:
    """Make ``app``'s OpenAPI document match what the service does (see the module)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                _use_error_body(operation, description)
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    if "schema" in media:
                        media["schema"] = _hoist_defs(media["schema"], components)
        if "HTTPValidationError" in components:
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            if ErrorResponse.__name__ not in components:
                components.update(_error_components())
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _use_error_body(operation: dict[str, Any], description: str) -> None:
    """FastAPI's own 422 (``HTTPValidationError``) -> the shared error body."""
    response = operation.get("responses", {}).get("422")
    if response is None:
        return
    content = response.get("content", {}).get("application/json", {})
    if content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
        response["description"] = description
        ref = f"#/components/schemas/{ErrorResponse.__name__}"
        response["content"] = {"application/json": {"schema": {"$ref": ref}}}


def _hoist_defs(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    """A pydantic JSON schema with its ``$defs`` moved into ``components``."""
    defs = schema.get("$defs")
    if not defs:
        return schema
    rest = {k: v for k, v in schema.items() if k != "$defs"}
    for name, definition in defs.items():
        components.setdefault(name, _rewrite_refs(definition))
    return _rewrite_refs(rest)


def _rewrite_refs(node: Any) -> Any:
    """Every ``#/$defs/X`` (``$ref`` values, discriminator mappings) -> ``#/components/...``."""
    if isinstance(node, dict):
        return {k: _rewrite_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    if isinstance(node, str) and node.startswith("#/$defs/"):
        return "#/components/schemas/" + node.removeprefix("#/$defs/")
    return node


def _error_components() -> dict[str, Any]:
    """``ErrorResponse`` and ``ErrorDetail`` as OpenAPI component schemas."""
    schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {ErrorResponse.__name__: schema, **defs}
