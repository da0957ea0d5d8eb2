"""Queries on datasets and single items (bulk item writes are in store.vectors)."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from clustering_service.db.tables import datasets, items
from clustering_service.errors import Conflict, NotFound

_COLUMNS = (
    datasets.c.id,
    datasets.c.name,
    datasets.c.count,
    datasets.c.dim,
    datasets.c.revision,
    datasets.c.created_at,
    datasets.c.updated_at,
)


def new_id() -> str:
    return "ds_" + secrets.token_hex(8)


def create(engine: Engine, name: str) -> dict[str, Any]:
    """A new empty dataset; Conflict (with the existing ``id``) when the name is taken."""
    try:
        with engine.begin() as conn:
            row = conn.execute(
                datasets.insert().values(id=new_id(), name=name).returning(*_COLUMNS)
            ).one()
    except IntegrityError:
        with engine.connect() as conn:
            existing = conn.execute(select(datasets.c.id).where(datasets.c.name == name)).scalar()
        raise Conflict(
            f"a dataset named {name!r} exists already (id {existing!r})", id=existing
        ) from None
    return dict(row._mapping)


def get(engine: Engine, dataset_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(select(*_COLUMNS).where(datasets.c.id == dataset_id)).one_or_none()
    if row is None:
        raise NotFound(f"no dataset with id {dataset_id!r}", resource="dataset")
    return dict(row._mapping)


def list_all(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(*_COLUMNS).order_by(datasets.c.created_at)).all()
    return [dict(r._mapping) for r in rows]


def existing_ids(engine: Engine, dataset_id: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` the dataset holds already."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(items.c.item_id).where(
                items.c.dataset_id == dataset_id, items.c.item_id.in_(ids)
            )
        ).all()
    return {r[0] for r in rows}


def get_item(engine: Engine, dataset_id: str, item_id: str) -> dict[str, Any]:
    """One item's id, label, meta and whether it has a thumbnail."""
    with engine.connect() as conn:
        row = conn.execute(
            select(
                items.c.item_id,
                items.c.label,
                items.c.meta,
                items.c.created_at,
                items.c.thumbnail.is_not(None).label("has_thumbnail"),
            ).where(items.c.dataset_id == dataset_id, items.c.item_id == item_id)
        ).one_or_none()
    if row is None:
        raise NotFound(f"dataset {dataset_id!r} has no item {item_id!r}", resource="item")
    return dict(row._mapping)


def thumbnail(engine: Engine, dataset_id: str, item_id: str) -> bytes:
    with engine.connect() as conn:
        data = conn.execute(
            select(items.c.thumbnail).where(
                items.c.dataset_id == dataset_id, items.c.item_id == item_id
            )
        ).scalar()
    if data is None:
        raise NotFound(
            f"dataset {dataset_id!r} has no thumbnail for item {item_id!r}", resource="thumbnail"
        )
    return data


def thumbnails(engine: Engine, dataset_id: str, ids: list[str]) -> dict[str, bytes]:
    """The thumbnails the dataset holds of ``ids`` (items without one are left out)."""
    get(engine, dataset_id)  # 404 for an unknown dataset
    with engine.connect() as conn:
        rows = conn.execute(
            select(items.c.item_id, items.c.thumbnail).where(
                items.c.dataset_id == dataset_id,
                items.c.item_id.in_(ids),
                items.c.thumbnail.is_not(None),
            )
        ).all()
    return {r.item_id: r.thumbnail for r in rows}
