"""Simulated hosts for the multi-host tests: each worker runs in a network namespace of its own, joined to
the test's namespace by two veth pairs, one to Redis and one to PostgreSQL, so a test can cut a host off
from either or both (the link goes down: packets are dropped, as in a real partition, not refused).
Redis and PostgreSQL are the site's own servers, listening only on loopback and on those links.
Everything made here is removed at the end, also when a test fails. Needs root (CI has it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

REDIS_NET, DB_NET = "10.213", "10.214"  # a /30 per host: .1 the site's end, .2 the host's
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
SKEWED_CLOCK = Path(__file__).with_name("skewed_clock")  # its sitecustomize works around a libfaketime bug


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Host:
    """A worker's simulated machine: its namespace and the site's ends of its two links."""

    index: int
    namespace: str
    redis_link: str  # the site's end of the veth pair to Redis
    db_link: str

    @property
    def redis_address(self) -> str:
        return f"{REDIS_NET}.{self.index}.1"

    @property
    def db_address(self) -> str:
        return f"{DB_NET}.{self.index}.1"

    def cut(self, redis_link: bool = True, db_link: bool = True) -> None:
        """A partition: the host's links go down (its packets are dropped)."""
        for link, cut in ((self.redis_link, redis_link), (self.db_link, db_link)):
            if cut:
                sh("ip", "link", "set", link, "down")

    def heal(self) -> None:
        for link in (self.redis_link, self.db_link):
            sh("ip", "link", "set", link, "up")

    def command(self, argv: list[str], env: dict[str, str], clock_offset: str | None = None) -> tuple[list[str], dict[str, str]]:
        """`argv` run on this host: in its namespace; with its clock off by `clock_offset` (libfaketime,
        e.g. "+40m"; preloaded rather than run through `faketime`, so the process keeps its pid)."""
        env = dict(env)
        if clock_offset:  # the wall clock only: timeouts run on the real monotonic clock
            env.update(LD_PRELOAD=LIBFAKETIME, FAKETIME=clock_offset, FAKETIME_DONT_FAKE_MONOTONIC="1",
                       FAKETIME_NO_CACHE="1", PYTHONPATH=os.pathsep.join([str(SKEWED_CLOCK), env.get("PYTHONPATH", "")]))
        return ["ip", "netns", "exec", self.namespace, *argv], env


class Site:
    """`hosts` simulated hosts, and a Redis and a PostgreSQL server that listen on their links."""

    def __init__(self, hosts: int) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.hosts: list[Host] = []
        self.folder = Path(tempfile.mkdtemp(prefix=f"gm-site-{self.tag}-"))
        self.redis: subprocess.Popen[bytes] | None = None
        self.pg_data: Path | None = None
        try:
            for i in range(1, hosts + 1):
                self.hosts.append(self._make_host(i))
            self._start_redis()
            self._start_postgres()
        except BaseException:
            self.close()
            raise

    def _make_host(self, i: int) -> Host:
        host = Host(i, f"gm-{self.tag}-h{i}", f"gm{self.tag}r{i}", f"gm{self.tag}d{i}")
        sh("ip", "netns", "add", host.namespace)
        sh("ip", "-n", host.namespace, "link", "set", "lo", "up")
        for link, net in ((host.redis_link, REDIS_NET), (host.db_link, DB_NET)):
            inside = f"{link}x"
            sh("ip", "link", "add", link, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", inside, "netns", host.namespace)
            sh("ip", "addr", "add", f"{net}.{i}.1/30", "dev", link)
            sh("ip", "link", "set", link, "up")
            sh("ip", "-n", host.namespace, "addr", "add", f"{net}.{i}.2/30", "dev", inside)
            sh("ip", "-n", host.namespace, "link", "set", inside, "up")
        return host

    def _start_redis(self) -> None:
        self.redis_port = free_port()
        binds = ["127.0.0.1", *(h.redis_address for h in self.hosts)]
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", *binds,
                                       "--protected-mode", "no", "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: redis.Redis(port=self.redis_port).ping(), "redis-server did not start")

    def _start_postgres(self) -> None:
        bin_dir = Path(max(glob.glob("/usr/lib/postgresql/*/bin")))
        self.pg_port = free_port()
        self.pg_data = self.folder / "pg"
        shutil.chown(self.folder, "postgres")
        postgres = ["runuser", "-u", "postgres", "--"]
        sh(*postgres, str(bin_dir / "initdb"), "-D", str(self.pg_data), "--auth=trust", "-U", "postgres")
        listen = ",".join(["127.0.0.1", *(h.db_address for h in self.hosts)])
        (self.pg_data / "pg_hba.conf").write_text("local all all trust\nhost all all 0.0.0.0/0 trust\n")
        sh(*postgres, str(bin_dir / "pg_ctl"), "-D", str(self.pg_data), "-l", str(self.folder / "pg.log"), "-w",
           "-o", f"-p {self.pg_port} -c listen_addresses={listen} -k {self.folder} -c fsync=off", "start")
        self._pg_ctl = [*postgres, str(bin_dir / "pg_ctl"), "-D", str(self.pg_data), "-m", "immediate", "stop"]

    def database(self) -> str:
        """A new database on the site's server; its name."""
        name = f"gm_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def urls(self, database: str, redis_db: int, host: Host | None = None) -> tuple[str, str]:
        """The database and broker URLs as `host` reaches them (None: the test's own process, on loopback)."""
        db_at = host.db_address if host else "127.0.0.1"
        redis_at = host.redis_address if host else "127.0.0.1"
        return (f"postgresql+psycopg://postgres@{db_at}:{self.pg_port}/{database}",
                f"redis://{redis_at}:{self.redis_port}/{redis_db}")

    def close(self) -> None:
        for host in self.hosts:
            for pid in sh("ip", "netns", "pids", host.namespace, check=False).split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", host.namespace, check=False)
            for link in (host.redis_link, host.db_link):  # gone with the namespace; in case it was not made
                sh("ip", "link", "del", link, check=False)
        if self.pg_data is not None and (self.pg_data / "postmaster.pid").exists():
            sh(*self._pg_ctl, check=False)
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _wait(ready, what: str, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # not up yet
            if ready():
                return
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.2)
