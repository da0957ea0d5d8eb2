"""Writes retried through a database outage, and only through one."""

from __future__ import annotations

import psycopg
import pytest

from clustering_service.db import retry


def test_a_write_is_retried_while_the_database_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def write(value: int) -> int:
        calls.append(value)
        if len(calls) < 3:
            raise psycopg.OperationalError("connection failed: Connection refused")
        return value * 2

    assert retry.through_outage(write, 21) == 42
    assert calls == [21, 21, 21]


def test_other_errors_and_long_outages_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        retry.through_outage(broken)
    assert len(calls) == 1

    monkeypatch.setattr(retry, "OUTAGE_SECONDS", 0.3)

    def away() -> None:
        raise psycopg.OperationalError("connection failed: Connection refused")

    with pytest.raises(psycopg.OperationalError):
        retry.through_outage(away)
