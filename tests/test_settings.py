"""Settings come from GRISTMILL_* variables; secrets never show in what we print."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from producer.service import Service
from schema.db import get_sessionmaker
from schema.errors import BrokerError
from schema.settings import Settings, redact
from schema.tables import Batch, Item
from tests.conftest import gristmill


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_DATABASE_URL", "postgresql+psycopg://u:p@db/x")
    monkeypatch.setenv("GRISTMILL_CHUNK_SIZE", "32")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u:p@db/x" and settings.chunk_size == 32
    assert Settings.model_fields["broker_url"].default == "filesystem://"


def test_vllm_options_are_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().vllm_options == {}
    monkeypatch.setenv("GRISTMILL_VLLM_OPTIONS", '{"max_num_seqs": 64, "enforce_eager": true}')
    assert Settings().vllm_options == {"max_num_seqs": 64, "enforce_eager": True}


@pytest.mark.parametrize(("url", "safe"), [
    ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://user:hunter2@host:6380/1", "rediss://user:***@host:6380/1"),
    ("postgresql+psycopg://gm:hunter2@db:5432/gm", "postgresql+psycopg://gm:***@db:5432/gm"),
    ("sqlite:///gristmill.db", "sqlite:///gristmill.db"),
])
def test_redact(url: str, safe: str) -> None:
    assert redact(url) == safe


def test_unreachable_broker_error_hides_password(sqlite_url: str, settings_for, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "hi"}\n')
    settings = settings_for(sqlite_url, "redis://:hunter2@127.0.0.1:1/0")
    proc = gristmill("submit", str(path), settings=settings, cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 1
    assert "could not be enqueued" in proc.stderr and "hunter2" not in proc.stderr + proc.stdout


def test_reconcile_with_the_broker_away_is_one_line(pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An open batch makes the reconciler ask Redis what it carries: with Redis away, one clear line."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "hi"}\n')
    settings = settings_for(pg_url, "redis://:hunter2@127.0.0.1:1/0")
    with pytest.raises(BrokerError):  # stored, then not enqueued: the batch is marked failed
        Service(settings).submit(path)
    with get_sessionmaker(pg_url)() as session, session.begin():  # as if it had been enqueued long ago
        session.execute(update(Batch).values(status="in_progress"))
        session.execute(update(Item).values(enqueued_at=Item.enqueued_at - timedelta(hours=1)))
    proc = gristmill("reconcile", settings=settings, cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot reach the broker redis://:***@127.0.0.1:1/0" in proc.stderr and "hunter2" not in proc.stderr


@pytest.mark.parametrize("command", [["status"], ["keys", "list"], ["schedule", "list"]])
def test_an_unreachable_database_is_one_line(command: list[str], settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "schedules.toml").write_text("")
    settings = settings_for("postgresql+psycopg://gm:hunter2@127.0.0.1:1/gristmill")
    proc = gristmill(*command, settings=settings, cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "cannot reach the database at postgresql+psycopg://gm:***@127.0.0.1:1" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


def test_tls_redis_urls_verify_certificates() -> None:
    import ssl

    from schema.queue import tls_options

    assert tls_options("rediss://:pw@redis.example:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options("rediss://:pw@redis.example:6380/0?ssl_cert_reqs=optional") is None
    assert tls_options("redis://127.0.0.1:6379/0") is None


def test_chunk_time_limit_must_stay_below_visibility_timeout() -> None:
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        Settings(chunk_time_limit_s=3000, visibility_timeout_s=3600)
