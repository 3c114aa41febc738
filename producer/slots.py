"""When a schedule fires: its cron slots in its own time zone, and which of them are due.

Slots are wall-clock times of the schedule's zone, turned into instants: a time that a spring-forward
skips does not exist and is skipped; a time that a fall-back repeats fires once, at its first
occurrence. After the beat was down the catch-up policy picks among the missed slots within the
look-back: `latest` the newest, `all` every one, `none` only a slot that is due right now.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

ON_TIME = timedelta(minutes=2)  # a slot this recent is due now, not a catch-up


def slots(cron: str, zone: ZoneInfo, after: datetime, until: datetime) -> Iterator[datetime]:
    """The slots in (after, until], as UTC instants, in order."""
    walk = croniter(cron, after.astimezone(zone).replace(tzinfo=None))  # naive wall-clock times
    while True:
        instant = instant_of(walk.get_next(datetime), zone)
        if instant is None:
            continue
        if instant > until:
            return
        if instant > after:
            yield instant


def instant_of(wall: datetime, zone: ZoneInfo) -> datetime | None:
    """The UTC instant of a wall-clock time, its first if it happens twice; None if it never happens."""
    aware = wall.replace(tzinfo=zone, fold=0)
    if aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall:
        return None  # in the hour a spring-forward skips
    return aware.astimezone(UTC)


def due(cron: str, zone: ZoneInfo, policy: str, last: datetime | None, now: datetime,
        look_back: timedelta) -> list[datetime]:
    """The slots to fire now. `last`: the newest slot already fired (None: never; then only a slot due
    now counts: a new schedule does not start with a catch-up)."""
    if last is None:
        return list(slots(cron, zone, now - ON_TIME, now))[-1:]
    missed = list(slots(cron, zone, max(last, now - look_back), now))
    if policy == "all":
        return missed
    if policy == "latest":
        return missed[-1:]
    return [slot for slot in missed if now - slot <= ON_TIME]


def latest(cron: str, zone: ZoneInfo, now: datetime) -> datetime | None:
    """The newest slot at or before now (None if there was none in the last year)."""
    walk = croniter(cron, now.astimezone(zone).replace(tzinfo=None) + timedelta(seconds=1))  # at `now` counts
    while True:
        wall = walk.get_prev(datetime)
        if wall < (now - timedelta(days=366)).astimezone(zone).replace(tzinfo=None):
            return None
        instant = instant_of(wall, zone)
        if instant is not None and instant <= now:
            return instant


def upcoming(cron: str, zone: ZoneInfo, now: datetime) -> datetime | None:
    return next(slots(cron, zone, now, now + timedelta(days=366)), None)
