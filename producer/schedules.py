"""The schedules file (TOML): what runs when, on what, and where its results go.

    [[schedule]]
    name = "nightly-tickets"
    cron = "30 2 * * *"
    timezone = "Europe/Berlin"
    source = { sql = "SELECT id, body AS text FROM tickets WHERE updated_at >= :since", url_env = "TICKETS_DB_URL" }
    task = { kind = "classify", labels = ["billing", "bug", "feature request", "other"] }
    sink = { sql_table = "ticket_labels", url_env = "TICKETS_DB_URL" }

A task table's keys are its kind's CLI flags with underscores (`max_tokens`, `system`, `labels`,
`labels_file`, `schema`, ...) plus `kind` and `model`; files it names (and globs and sink paths) are
relative to the schedules file. Every problem is an InputError naming the file, the schedule and the field.
"""

from __future__ import annotations

import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from schema import kinds
from schema.errors import ConfigError, InputError
from schema.kinds.flags import spec_flags, split_list
from schema.queue import parse_priority

DEFAULT_FILE = "schedules.toml"
_STRICT = ConfigDict(extra="forbid")


class GlobSource(BaseModel):
    """Files matching a glob: one item per file (id: its path), or per line of a .jsonl or .csv file."""

    model_config = _STRICT
    glob: str


class UserDatabase(BaseModel):
    """A database of the user's: its SQLAlchemy URL, best from an environment variable (no password in
    the file)."""

    model_config = _STRICT
    url_env: str | None = None
    url: str | None = None

    def database_url(self) -> str:
        url = self.url or os.environ.get(self.url_env or "")
        if not url:
            raise InputError(f"${self.url_env}", None, None, "the database URL is not set")
        return url


class SqlSource(UserDatabase):
    """Rows of a query (columns `id` and `text`) on any SQLAlchemy URL; `:since` is the watermark: the last
    successful run's start less `lag_s` (late commits), or the epoch before the first success."""

    sql: str
    lag_s: Annotated[int, Field(ge=0)] = 300

    @model_validator(mode="after")
    def _one_url(self) -> SqlSource:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give url_env (or url)")
        return self


class Sink(UserDatabase):
    """Where results go besides gristmill's SQL: a table of the user's database (upserted by id) and/or a
    JSONL or CSV file whose path may hold {date} (the slot's date) and {name}."""

    sql_table: str | None = None
    jsonl: str | None = None
    csv: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> Sink:
        if self.sql_table and (self.url is None) == (self.url_env is None):
            raise ValueError("sql_table needs url_env (or url)")
        if not (self.sql_table or self.jsonl or self.csv):
            raise ValueError("give sql_table, jsonl or csv")
        return self


class Schedule(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    cron: str
    timezone: str = "UTC"
    source: Annotated[Annotated[GlobSource, Tag("glob")] | Annotated[SqlSource, Tag("sql")],
                      Discriminator(lambda v: "sql" if "sql" in (v if isinstance(v, dict) else vars(v)) else "glob")]
    task: dict[str, Any]
    sink: Sink | None = None
    catch_up: Literal["latest", "all", "none"] = "latest"  # after the beat was down: newest slot, every slot, none
    look_back_h: Annotated[float, Field(gt=0)] = 24  # slots older than this are never caught up
    deadline_min: Annotated[float, Field(gt=0)] | None = None  # a run unfinished this long after its slot is late
    enabled: bool = True
    priority: str | int = "normal"  # of its batches: high, normal, low or 0-9 (schema.queue)
    # derived from `task` when loaded
    kind: str = ""
    model: str | None = None
    spec: dict[str, Any] = {}

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not croniter.is_valid(value) or len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a 5-field cron expression (minute hour day month weekday)")
        return value

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str | int) -> str | int:
        try:
            parse_priority(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def look_back(self) -> timedelta:
        return timedelta(hours=self.look_back_h)


def schedules_path(given: str | None) -> Path:
    """--schedules FILE, else GRISTMILL_SCHEDULES, else ./schedules.toml."""
    return Path(given or os.environ.get("GRISTMILL_SCHEDULES") or DEFAULT_FILE)


def load(path: Path) -> dict[str, Schedule]:
    """Every schedule of the file, by name; InputError names the file, schedule and field of a problem."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(str(path), None, None, f"cannot read the schedules file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(str(path), getattr(exc, "lineno", None), None, f"not valid TOML: {exc}") from None
    unknown = set(document) - {"schedule"}
    if unknown:
        raise InputError(str(path), None, min(unknown), "only [[schedule]] tables belong in a schedules file")
    found: dict[str, Schedule] = {}
    for number, table in enumerate(document.get("schedule", []), 1):
        name = table.get("name") if isinstance(table, dict) else None
        where = f"{path} schedule {name!r}" if isinstance(name, str) else f"{path} schedule #{number}"
        schedule = _schedule(table, where, path.parent)
        if schedule.name in found:
            raise InputError(where, None, "name", "two schedules have this name")
        found[schedule.name] = schedule
    return found


def _schedule(table: dict[str, Any], where: str, base: Path) -> Schedule:
    try:
        schedule = Schedule.model_validate(table)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        field = ".".join(loc[:1] + loc[2:] if loc[0] == "source" else loc) or None  # loc[1]: the source's tag
        raise InputError(where, None, field, first["msg"].removeprefix("Value error, ")) from None
    kind, model, spec = task_spec(schedule.task, where, base)
    if isinstance(schedule.source, GlobSource) and not Path(schedule.source.glob).is_absolute():
        schedule.source.glob = str(base / schedule.source.glob)
    for field in ("jsonl", "csv"):
        value = getattr(schedule.sink, field, None)
        if value and not Path(value).is_absolute():
            setattr(schedule.sink, field, str(base / value))
    return schedule.model_copy(update={"kind": kind, "model": model, "spec": spec})


def task_spec(task: dict[str, Any], where: str, base: Path) -> tuple[str, str | None, dict[str, Any]]:
    """The task table as (kind, model, spec values), its keys read as the kind's CLI flags."""
    table = dict(task)
    kind_name = table.pop("kind", "generate")
    if kind_name not in kinds.KINDS:
        raise InputError(where, None, "task.kind", f"{kind_name!r}: use one of {', '.join(kinds.KINDS)}")
    kind = kinds.get(kind_name)
    model = table.pop("model", None)
    flags = {f.option.removeprefix("--").replace("-", "_"): f for f in spec_flags(kind.spec_model)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key.endswith("_file") and key.removesuffix("_file") in kind.file_flags:
            values[key.removesuffix("_file")] = kind.file_flags[key.removesuffix("_file")](str(base / value))
            continue
        flag = flags.get(key)
        if flag is None:
            raise InputError(where, None, f"task.{key}", f"not a flag of task kind {kind_name!r}; it takes "
                                                         f"{', '.join(sorted([*flags, 'model']))}")
        if flag.load is not None:
            value = flag.load(str(base / value))
        elif flag.options.get("type") is split_list and isinstance(value, str):
            value = split_list(value)
        target = values
        for step in flag.path[:-1]:
            target = target.setdefault(step, {})
        target[flag.path[-1]] = value
    try:
        kind.spec(**values)  # the same checks as a submission's
    except (ValidationError, InputError, ValueError) as exc:
        message = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise InputError(where, None, "task", message) from None
    return kind_name, model, values
