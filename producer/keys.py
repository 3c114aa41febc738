"""API keys of the HTTP API: created once (the key is shown then and never again), stored as a salted
HMAC-SHA256, checked in constant time, revoked by name.

A key is "gm-" and 43 URL-safe characters (256 random bits): a single keyed hash is as strong as a slow
password hash here, and costs microseconds per request. Its first characters find its row.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from schema.db import get_sessionmaker, utcnow
from schema.errors import GristmillError, InputError
from schema.settings import Settings
from schema.tables import ApiKey

PREFIX = "gm-"
LOOKUP_CHARS = 8  # after the prefix
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class KeyNotFound(GristmillError):
    """No live key has the given name."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the key."""

    name: str
    project: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None


def create(settings: Settings, name: str, project: str, admin: bool = False) -> str:
    """A new key for `project` (every project when `admin`); returns the key, the only time it exists."""
    for field, value in (("--name", name), ("--project", project)):
        if not NAME.fullmatch(value):
            raise InputError(field, None, None, f"{value!r}: use 1-128 letters, digits, '.', '_' or '-'")
    key = PREFIX + secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    row = ApiKey(name=name, project=project, admin=admin, lookup=_lookup(key), salt=salt,
                 digest=_digest(salt, key), created_at=utcnow())
    try:
        with get_sessionmaker(settings.database_url)() as session, session.begin():
            session.add(row)
    except IntegrityError:
        raise InputError("--name", None, None, f"a key named {name!r} exists already") from None
    return key


def verify(settings: Settings, key: str) -> KeyInfo | None:
    """The live key's owner, or None for an unknown, malformed or revoked key."""
    if not key.startswith(PREFIX) or len(key) < len(PREFIX) + LOOKUP_CHARS:
        return None
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.lookup == _lookup(key), ApiKey.revoked_at.is_(None)))
        match = next((row for row in rows if hmac.compare_digest(row.digest, _digest(row.salt, key))), None)
        return _info(match) if match else None


def list_keys(settings: Settings) -> list[KeyInfo]:
    with get_sessionmaker(settings.database_url)() as session:
        return [_info(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]


def revoke(settings: Settings, name: str) -> None:
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        row = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
        if row is None:
            raise KeyNotFound(f"no live key named {name!r}")
        row.revoked_at = utcnow()


def any_live(settings: Settings) -> bool:
    """Whether a key exists that is not revoked (the HTTP API then requires one)."""
    with get_sessionmaker(settings.database_url)() as session:
        return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None


def _lookup(key: str) -> str:
    return key[len(PREFIX) : len(PREFIX) + LOOKUP_CHARS]


def _digest(salt: str, key: str) -> str:
    return hmac.new(bytes.fromhex(salt), key.encode(), hashlib.sha256).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.name, row.project, row.admin, row.created_at, row.revoked_at)
