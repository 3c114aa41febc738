"""API keys for the HTTP API: `gristmill keys create` prints the key once and stores only a salted hash;
verify finds the live key's project; a wrong, malformed or revoked key is refused."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, text

from producer import keys
from schema.db import get_engine, get_sessionmaker
from schema.tables import ApiKey
from tests.conftest import gristmill


def test_keys_from_the_cli(db_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    created = gristmill("keys", "create", "--name", "analytics", "--project", "analytics", settings=settings,
                        cwd=tmp_path)
    key = created.stdout.strip()
    assert key.startswith("gm-") and len(key) == 46 and created.stdout == key + "\n"  # the key, nothing else
    admin = gristmill("keys", "create", "--name", "ops", "--admin", settings=settings, cwd=tmp_path).stdout.strip()

    info = keys.verify(settings, key)
    assert info is not None and (info.name, info.project, info.admin) == ("analytics", "analytics", False)
    assert keys.verify(settings, admin).admin  # type: ignore[union-attr]
    assert keys.verify(settings, key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # one character off
    assert keys.verify(settings, "gm-short") is None and keys.verify(settings, "sk-" + key[3:]) is None

    with get_engine(db_url).connect() as conn:  # the key is nowhere in the database
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    assert key not in dump and key[3:] not in dump and admin[3:] not in dump

    listed = gristmill("keys", "list", settings=settings, cwd=tmp_path).stdout
    assert "analytics" in listed and "ops" in listed and key not in listed

    again = gristmill("keys", "create", "--name", "analytics", settings=settings, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "exists already" in again.stderr and again.stdout == ""
    bad = gristmill("keys", "create", "--name", "../etc", settings=settings, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--name" in bad.stderr

    gristmill("keys", "revoke", "analytics", settings=settings, cwd=tmp_path)
    assert keys.verify(settings, key) is None and keys.verify(settings, admin) is not None
    gone = gristmill("keys", "revoke", "analytics", settings=settings, cwd=tmp_path, check=False)
    assert gone.returncode == 1 and "no live key named 'analytics'" in gone.stderr
    assert keys.any_live(settings)
    with get_sessionmaker(db_url)() as session:
        assert session.scalar(select(ApiKey.revoked_at).where(ApiKey.name == "analytics")) is not None
