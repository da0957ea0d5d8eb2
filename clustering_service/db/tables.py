"""The schema, as SQLAlchemy Core tables (created and upgraded only by the
Alembic migrations in ``migrations/versions``; keep both in step).

Vectors are stored per item as little-endian float32 ``bytea`` (4 x dim
bytes): one row per item keeps ingest idempotent per id and deletes simple,
and a fixed row size lets a dataset be read back with one binary ``COPY``
parsed by numpy in a single pass (:mod:`clustering_service.store.vectors`).
Model artifacts (weights, assignments) are files split into chunks
(:mod:`clustering_service.store.artifacts`).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()


def _now() -> Column:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


datasets = Table(
    "datasets",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("dim", Integer),
    Column("count", BigInteger, nullable=False, server_default="0"),
    # bumped by every change of the items: names a snapshot for the vector cache
    Column("revision", BigInteger, nullable=False, server_default="0"),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

items = Table(
    "items",
    metadata,
    # Primary key (dataset_id, pk): one index gives both uniqueness and the
    # dataset's items in insertion order (snapshots), cheaper to maintain than two.
    Column("pk", BigInteger, Identity(), nullable=False),
    # No foreign key: its per-row trigger doubled the cost of a bulk insert. Every
    # write locks the dataset row first (store.vectors), which keeps items consistent.
    Column("dataset_id", String(40), nullable=False),
    Column("item_id", String(512), nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Column("label", Text),
    Column("meta", JSONB),
    Column("thumbnail", LargeBinary),
    _now(),
    UniqueConstraint("dataset_id", "item_id", name="items_dataset_item_key"),
    PrimaryKeyConstraint("dataset_id", "pk", name="items_pkey"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("type", String(20), nullable=False),
    Column("state", String(20), nullable=False, index=True),
    Column("dataset_id", String(40)),
    Column("model_name", String(200), index=True),
    Column("algorithm", String(40)),
    Column("spec", JSONB, nullable=False),
    Column("progress", JSONB),
    Column("error", JSONB),
    Column("result", JSONB),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("cancel_requested", Boolean, nullable=False, server_default="false"),
    Column("idempotency_key", String(200), unique=True),
    Column("request_hash", String(64)),
    Column("queue_job_id", BigInteger),
    Column("worker", String(200)),
    _now(),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

models = Table(
    "models",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("latest_version", Integer, nullable=False, server_default="0"),
    _now(),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("pk", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "model_name",
        String(200),
        ForeignKey("models.name", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("version", Integer, nullable=False),
    Column("job_id", String(40)),
    Column("algorithm", String(40), nullable=False),
    Column("params", JSONB, nullable=False),
    Column("n_clusters", Integer, nullable=False),
    Column("dim", Integer, nullable=False),
    Column("dataset_id", String(40)),
    Column("dataset_revision", BigInteger),
    Column("item_count", BigInteger, nullable=False),
    Column("parent_version", Integer),
    # the smallest cluster id never handed out in this model's lineage
    Column("next_cluster_id", Integer, nullable=False),
    Column("metrics", JSONB, nullable=False),
    Column("stability", JSONB),
    Column("k_selection", JSONB),
    Column("clusters", JSONB, nullable=False),
    Column("fit_seconds", Float),
    _now(),
    UniqueConstraint("model_name", "version", name="model_versions_name_version_key"),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("pk", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "version_pk",
        BigInteger,
        ForeignKey("model_versions.pk", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", String(200), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    UniqueConstraint("version_pk", "name", name="artifacts_version_name_key"),
)

artifact_chunks = Table(
    "artifact_chunks",
    metadata,
    Column(
        "artifact_pk",
        BigInteger,
        ForeignKey("artifacts.pk", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

aliases = Table(
    "aliases",
    metadata,
    Column(
        "model_name",
        String(200),
        ForeignKey("models.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("alias", String(200), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

alias_events = Table(
    "alias_events",
    metadata,
    Column("pk", BigInteger, primary_key=True, autoincrement=True),
    Column("model_name", String(200), nullable=False),
    Column("alias", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("previous_version", Integer),
    Column("changed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("alias_events_model_alias", "model_name", "alias"),
)
