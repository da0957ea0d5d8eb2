"""Alembic migrations of the clustering service (see ../migrate.py)."""
