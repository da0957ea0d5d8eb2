"""Queries on models, their immutable versions and aliases.

A version is created by :func:`create_version` in one transaction with its
artifacts and the end of the job that made it: it is visible complete or not
at all. Version numbers count from 1 per model name; the ``models`` row is
locked while the next number is taken, so concurrent jobs never collide.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from clustering_service.db import jobs as jobs_db
from clustering_service.db.tables import alias_events, aliases, model_versions, models
from clustering_service.errors import NotFound
from clustering_service.store.artifacts import save_files

_VERSION_COLUMNS = [c for c in model_versions.c if c.name != "clusters"]
_PRIVATE = frozenset({"pk", "next_cluster_id", "dataset_revision", "clusters"})


def public_version(row: Any) -> dict[str, Any]:
    """A model_versions row -> the API's version object (``params`` are the estimator's
    full hyper-parameters; ``seed`` is their ``random_state``)."""
    m = {k: v for k, v in row._mapping.items() if k not in _PRIVATE}
    m["seed"] = m["params"].get("random_state")
    return m


def create_version(
    engine: Engine,
    *,
    model_name: str,
    values: dict[str, Any],
    files: Path,
    job_id: str,
) -> int:
    """Store a new version of ``model_name`` with the files of ``files`` and end
    the job ``job_id`` as succeeded, atomically. Returns the version number.

    Raises JobNotRunning (nothing stored) when the job was cancelled or
    finished meanwhile.
    """
    with engine.begin() as conn:
        conn.execute(pg_insert(models).values(name=model_name).on_conflict_do_nothing())
        latest = conn.execute(
            select(models.c.latest_version).where(models.c.name == model_name).with_for_update()
        ).scalar_one()
        version = latest + 1
        pk = conn.execute(
            model_versions.insert()
            .values(model_name=model_name, version=version, job_id=job_id, **_jsonable(values))
            .returning(model_versions.c.pk)
        ).scalar_one()
        save_files(conn, pk, files)
        conn.execute(
            models.update().where(models.c.name == model_name).values(latest_version=version)
        )
        result = {"model_name": model_name, "version": version}
        if not jobs_db.finish(conn, job_id, "succeeded", result=result):
            raise JobNotRunning(f"job {job_id} ended before its version was stored")
    return version


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays -> Python; NaN and infinities (which jsonb refuses) -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JobNotRunning(RuntimeError):
    """The job was cancelled (or ended) while it ran: its result is discarded."""


def _model_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(*models.c).where(models.c.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"no model named {name!r}", resource="model")
    return row


def _aliases(conn: Connection, name: str) -> dict[str, int]:
    rows = conn.execute(
        select(aliases.c.alias, aliases.c.version).where(aliases.c.model_name == name)
    ).all()
    return dict(rows)


def list_models(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(*models.c).order_by(models.c.name)).all()
        all_aliases = conn.execute(select(*aliases.c)).all()
    by_model: dict[str, dict[str, int]] = {}
    for a in all_aliases:
        by_model.setdefault(a.model_name, {})[a.alias] = a.version
    return [
        {
            "name": r.name,
            "latest_version": r.latest_version,
            "created_at": r.created_at,
            "aliases": by_model.get(r.name, {}),
        }
        for r in rows
    ]


def get_model(engine: Engine, name: str) -> dict[str, Any]:
    """The model with all its versions, aliases and alias history."""
    with engine.connect() as conn:
        row = _model_row(conn, name)
        versions = conn.execute(
            select(*_VERSION_COLUMNS)
            .where(model_versions.c.model_name == name)
            .order_by(model_versions.c.version)
        ).all()
        history = conn.execute(
            select(*alias_events.c)
            .where(alias_events.c.model_name == name)
            .order_by(alias_events.c.pk)
        ).all()
        current = _aliases(conn, name)
    return {
        "name": row.name,
        "latest_version": row.latest_version,
        "created_at": row.created_at,
        "aliases": current,
        "versions": [public_version(v) for v in versions],
        "alias_history": [dict(h._mapping) for h in history],
    }


#: the largest version number the database holds (its column is a 4-byte integer)
MAX_VERSION = 2**31 - 1


def _check_version(name: str, version: int | None) -> None:
    """404 for a version number no model can have (and the database cannot compare)."""
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise NotFound(f"model {name!r} has no version {version}", resource="version")


def resolve(engine: Engine, name: str, version: int | None = None, alias: str | None = None) -> Any:
    """The version row of ``name`` by number, by alias, or the latest (404s name what
    is missing)."""
    _check_version(name, version)
    with engine.connect() as conn:
        model = _model_row(conn, name)
        if alias is not None:
            version = conn.execute(
                select(aliases.c.version).where(
                    aliases.c.model_name == name, aliases.c.alias == alias
                )
            ).scalar()
            if version is None:
                raise NotFound(f"model {name!r} has no alias {alias!r}", resource="alias")
        elif version is None:
            version = model.latest_version
        row = conn.execute(
            select(*model_versions.c).where(
                model_versions.c.model_name == name, model_versions.c.version == version
            )
        ).one_or_none()
    if row is None:
        raise NotFound(f"model {name!r} has no version {version}", resource="version")
    return row


def resolve_brief(
    engine: Engine, name: str, version: int | None = None, alias: str | None = None
) -> tuple[int, int, int]:
    """``(pk, version, dim)`` of the version :func:`resolve` would find, in one query
    (prediction's hot path); 404s as :func:`resolve`."""
    _check_version(name, version)
    v = model_versions.c
    query = select(v.pk, v.version, v.dim).where(v.model_name == name)
    if alias is not None:
        query = query.where(
            v.version
            == select(aliases.c.version)
            .where(aliases.c.model_name == name, aliases.c.alias == alias)
            .scalar_subquery()
        )
    elif version is not None:
        query = query.where(v.version == version)
    else:
        query = query.where(
            v.version
            == select(models.c.latest_version).where(models.c.name == name).scalar_subquery()
        )
    with engine.connect() as conn:
        row = conn.execute(query).one_or_none()
    if row is None:
        resolve(engine, name, version, alias)  # raises the 404 naming what is missing
        raise NotFound(f"model {name!r} has no such version", resource="version")
    return row.pk, row.version, row.dim


def set_alias(engine: Engine, name: str, alias: str, version: int) -> dict[str, Any]:
    """Point ``alias`` at ``version`` (creating it), recording the move."""
    _check_version(name, version)
    with engine.begin() as conn:
        model = conn.execute(
            select(*models.c).where(models.c.name == name).with_for_update()
        ).one_or_none()
        if model is None:
            raise NotFound(f"no model named {name!r}", resource="model")
        exists = conn.execute(
            select(model_versions.c.pk).where(
                model_versions.c.model_name == name, model_versions.c.version == version
            )
        ).scalar()
        if exists is None:
            raise NotFound(f"model {name!r} has no version {version}", resource="version")
        previous = conn.execute(
            select(aliases.c.version).where(aliases.c.model_name == name, aliases.c.alias == alias)
        ).scalar()
        stmt = pg_insert(aliases).values(model_name=name, alias=alias, version=version)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[aliases.c.model_name, aliases.c.alias],
                set_={"version": version, "updated_at": stmt.excluded.updated_at},
            )
        )
        if previous != version:
            conn.execute(
                alias_events.insert().values(
                    model_name=name, alias=alias, version=version, previous_version=previous
                )
            )
    return {"model_name": name, "alias": alias, "version": version, "previous_version": previous}
