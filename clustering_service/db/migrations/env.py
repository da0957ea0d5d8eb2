"""Alembic environment: always run from :func:`clustering_service.db.migrate.upgrade`,
which hands over an open connection (no alembic.ini, no URL in files)."""

from __future__ import annotations

from alembic import context

from clustering_service.db.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
