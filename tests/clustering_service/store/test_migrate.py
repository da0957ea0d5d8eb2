"""The schema is created by migrating, and procrastinate's part stays in step."""

from __future__ import annotations

from pathlib import Path

import procrastinate
from procrastinate.schema import SchemaManager
from sqlalchemy import Engine

from clustering_service.db import migrate


def test_database_is_at_head_and_upgrade_is_idempotent(engine: Engine) -> None:
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert migrate.upgrade(engine) == migrate.head_revision()


def test_frozen_procrastinate_schema_matches_the_installed_version() -> None:
    """Upgrading procrastinate fails here until a migration applies its changes."""
    frozen = migrate.MIGRATIONS / f"procrastinate_{procrastinate.__version__}.sql"
    assert frozen.exists(), (
        f"procrastinate {procrastinate.__version__} is installed but the migrations hold "
        f"{[p.name for p in Path(migrate.MIGRATIONS).glob('procrastinate_*.sql')]}: add a "
        "migration with procrastinate's migration files"
    )
    assert frozen.read_text() == SchemaManager.get_schema()
