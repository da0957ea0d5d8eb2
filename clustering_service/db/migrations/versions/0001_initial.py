"""Initial schema: datasets, items, jobs, models, versions, artifacts, aliases,
and procrastinate's own tables (its 3.10.0 schema, frozen in
``procrastinate_3.10.0.sql``; upgrading procrastinate means adding a migration
with its migration files, never editing this one).

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PROCRASTINATE_SCHEMA = Path(__file__).resolve().parents[1] / "procrastinate_3.10.0.sql"


def _created() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    # The raw driver connection: the schema holds many statements, $$ bodies and
    # '%' signs that no parameter style may touch.
    op.get_bind().connection.driver_connection.execute(PROCRASTINATE_SCHEMA.read_text())

    op.create_table(
        "datasets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("dim", sa.Integer),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("revision", sa.BigInteger, nullable=False, server_default="0"),
        _created(),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "items",
        sa.Column("pk", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("dataset_id", sa.String(40), nullable=False),
        sa.Column("item_id", sa.String(512), nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("meta", JSONB),
        sa.Column("thumbnail", sa.LargeBinary),
        _created(),
        sa.UniqueConstraint("dataset_id", "item_id", name="items_dataset_item_key"),
        # one index for both the dataset's items in insertion order and uniqueness
        sa.PrimaryKeyConstraint("dataset_id", "pk", name="items_pkey"),
    )
    # float32 vectors and WebP thumbnails do not compress: skip pglz's attempt.
    op.execute("ALTER TABLE items ALTER COLUMN vector SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE items ALTER COLUMN thumbnail SET STORAGE EXTERNAL")
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("state", sa.String(20), nullable=False, index=True),
        sa.Column("dataset_id", sa.String(40)),
        sa.Column("model_name", sa.String(200), index=True),
        sa.Column("algorithm", sa.String(40)),
        sa.Column("spec", JSONB, nullable=False),
        sa.Column("progress", JSONB),
        sa.Column("error", JSONB),
        sa.Column("result", JSONB),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("queue_job_id", sa.BigInteger),
        sa.Column("worker", sa.String(200)),
        _created(),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "models",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("latest_version", sa.Integer, nullable=False, server_default="0"),
        _created(),
    )
    op.create_table(
        "model_versions",
        sa.Column("pk", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "model_name",
            sa.String(200),
            sa.ForeignKey("models.name", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("job_id", sa.String(40)),
        sa.Column("algorithm", sa.String(40), nullable=False),
        sa.Column("params", JSONB, nullable=False),
        sa.Column("n_clusters", sa.Integer, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("dataset_id", sa.String(40)),
        sa.Column("dataset_revision", sa.BigInteger),
        sa.Column("item_count", sa.BigInteger, nullable=False),
        sa.Column("parent_version", sa.Integer),
        sa.Column("next_cluster_id", sa.Integer, nullable=False),
        sa.Column("metrics", JSONB, nullable=False),
        sa.Column("stability", JSONB),
        sa.Column("k_selection", JSONB),
        sa.Column("clusters", JSONB, nullable=False),
        sa.Column("fit_seconds", sa.Float),
        _created(),
        sa.UniqueConstraint("model_name", "version", name="model_versions_name_version_key"),
    )
    op.create_table(
        "artifacts",
        sa.Column("pk", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "version_pk",
            sa.BigInteger,
            sa.ForeignKey("model_versions.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.UniqueConstraint("version_pk", "name", name="artifacts_version_name_key"),
    )
    op.create_table(
        "artifact_chunks",
        sa.Column(
            "artifact_pk",
            sa.BigInteger,
            sa.ForeignKey("artifacts.pk", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.execute("ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL")
    op.create_table(
        "aliases",
        sa.Column(
            "model_name",
            sa.String(200),
            sa.ForeignKey("models.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("alias", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "alias_events",
        sa.Column("pk", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("previous_version", sa.Integer),
        sa.Column(
            "changed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("alias_events_model_alias", "alias_events", ["model_name", "alias"])


def downgrade() -> None:
    raise NotImplementedError("the initial schema is not downgraded: drop the database instead")
