"""`rediss://` end to end: a test-owned redis-server that speaks only TLS, with a certificate from a
test-owned CA. A real worker runs a batch over it, `gristmill reconcile` requeues over it, and a
client that trusts another CA is refused at once with an error that names the broker.

The CA reaches kombu (producer and worker) and redis-py (the reconciler) as the URL's `ssl_ca_certs`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from producer import api
from schema.errors import BrokerError
from schema.jobs import SamplingParams
from schema.queue import queue_for
from schema.settings import Settings
from schema.states import BatchStatus
from tests.conftest import gristmill, messages_waiting
from tests.test_faults import FAST_RECOVERY, RedisServer, Workers, assert_consistent, wait_until

NULL_ENGINE = "bench.null_engine:NullEngine"  # the engine is not the subject here


@dataclass
class Certs:
    ca: Path  # the CA the server's certificate is signed by
    wrong_ca: Path  # another CA, that signed nothing the server has
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"openssl {args[0]} failed:\n{proc.stderr}"


def make_certs(folder: Path) -> Certs:
    """Two CAs and a server certificate for 127.0.0.1 signed by the first (P-256 keys: fast to make)."""
    folder.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "wrong_ca"):
        _openssl("req", "-x509", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
                 "-subj", f"/CN=gristmill test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=folder)
    return Certs(folder / "ca.pem", folder / "wrong_ca.pem", folder / "server.pem", folder / "server.key")


def tls_url(port: int, ca: Path) -> str:
    return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={quote(str(ca), safe='/')}"


class TlsRedisServer(RedisServer):
    """tests/test_faults.py's RedisServer, listening on a TLS port only (`--port 0`)."""

    def __init__(self, folder: Path, certs: Certs) -> None:
        super().__init__(folder, appendonly=False)
        self.certs = certs

    @property
    def url(self) -> str:
        return tls_url(self.port, self.certs.ca)

    def start(self) -> None:
        with open(self.folder / "redis-server.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.folder), "--tls-cert-file", str(self.certs.cert),
                 "--tls-key-file", str(self.certs.key), "--tls-ca-cert-file", str(self.certs.ca),
                 "--tls-auth-clients", "no"], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, 10, "TLS redis-server did not start")

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, (self.folder / "redis-server.log").read_text()
        ping = subprocess.run(["redis-cli", "--tls", "--cacert", str(self.certs.ca), "-p", str(self.port), "ping"],
                              capture_output=True, timeout=10, check=False)
        return ping.stdout.strip() == b"PONG"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    folder = tmp_path / "redis"
    server = TlsRedisServer(folder, make_certs(folder))
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            server.stop()


def docs(tmp_path: Path, name: str, n: int) -> Path:
    """n lines whose texts are the name's own (the result cache would answer a text seen before)."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": f"{name}-{i:02d}", "text": f"Say {i} ({name})."}) + "\n" for i in range(n)))
    return path


def submit(settings: Settings, path: Path) -> api.BatchHandle:
    return api.submit(path, settings=settings, sampling=SamplingParams(max_tokens=4))


@pytest.mark.timeout(300)
def test_batch_and_reconcile_over_tls(tls_redis: TlsRedisServer, pg_url: str, settings_for,  # type: ignore[no-untyped-def]
                                      tmp_path: Path) -> None:
    settings = settings_for(pg_url, tls_redis.url, **{**FAST_RECOVERY, "chunk_size": 4})
    client = redis.Redis.from_url(tls_redis.url)  # verifies the server against the test's CA
    queue = queue_for(settings.model, "generate")
    group = Workers(settings, tmp_path)
    try:
        group.start(NULL_ENGINE)
        first = submit(settings, docs(tmp_path, "first", 16))
        assert first.wait(timeout=120).status == BatchStatus.completed, group.logs()
        assert assert_consistent(settings, first.id) == {"succeeded": 16}
        group.stop_all()

        # With no worker running, the second batch's 4 messages wait in Redis; then they are lost.
        second = submit(settings, docs(tmp_path, "second", 16))
        assert messages_waiting(client, queue) == 4
        client.flushdb()
        time.sleep(FAST_RECOVERY["requeue_grace_s"] + 1)  # past the grace period: now they count as lost
        proc = gristmill("reconcile", settings=settings, cwd=tmp_path, timeout=120)
        assert "16 items requeued" in proc.stderr, proc.stderr
        assert messages_waiting(client, queue) == 4, "reconcile did not send the lost chunks again"

        group.start(NULL_ENGINE)
        assert second.wait(timeout=120).status == BatchStatus.completed, group.logs()
        assert assert_consistent(settings, second.id) == {"succeeded": 16}
    finally:
        group.stop_all()
        client.close()


@pytest.mark.timeout(120)
def test_wrong_ca_is_refused(tls_redis: TlsRedisServer, pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A client that does not trust the server's certificate fails fast, naming the broker; nothing hangs."""
    settings = settings_for(pg_url, tls_url(tls_redis.port, tls_redis.certs.wrong_ca))
    broker = f"rediss://127.0.0.1:{tls_redis.port}/0"
    started = time.monotonic()
    with pytest.raises(BrokerError) as refused:
        submit(settings, docs(tmp_path, "refused", 4))
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert broker in message and "certificate verify failed" in message, message
    batch_id = message.split()[1]
    assert api.open_batch(batch_id, settings).status().status == BatchStatus.failed  # not left in_progress

    proc = gristmill("submit", str(docs(tmp_path, "cli", 4)), settings=settings, cwd=tmp_path, timeout=60,
                     check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: batch ") and broker in last and "certificate verify failed" in last, proc.stderr
