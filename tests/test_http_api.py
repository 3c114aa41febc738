"""The HTTP API through the official OpenAI Python client, against a real `gristmill serve` process and a
real worker process (the no-inference HoldingEngine: the subject is the API, not the engine; its gate
holds chunks running so a cancel lands mid-batch)."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletion
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from producer import keys
from schema.db import get_sessionmaker, prepare_schema
from schema.settings import Settings
from schema.tables import Worker
from tests.conftest import REPO, cli_env

HOLDING = "tests.fault_engine:HoldingEngine"
QUESTIONS = REPO / "examples" / "questions.jsonl"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start(args: list[str], settings: Settings, tmp_path: Path, log: str) -> subprocess.Popen[bytes]:
    with open(tmp_path / log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=cli_env(settings), cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def stack(sqlite_url: str, settings_for, tmp_path: Path) -> Iterator[tuple[Settings, str, dict[str, str], str]]:  # type: ignore[no-untyped-def]
    """A worker and `gristmill serve` on one SQLite database and the embedded broker; keys of two projects."""
    settings = settings_for(sqlite_url, reconcile_interval_s=2, max_upload_bytes=20_000)
    prepare_schema(sqlite_url)
    made = {"a": keys.create(settings, "team-a", "a"), "b": keys.create(settings, "team-b", "b"),
            "admin": keys.create(settings, "ops", "ops", admin=True)}
    port, second, metrics_port = free_port(), free_port(), free_port()
    (tmp_path / "metrics_port").write_text(str(metrics_port))
    procs = [start(["worker", "--engine", HOLDING, "--metrics-port", str(metrics_port)], settings, tmp_path,
                   "worker.log"),
             start(["serve", "--port", str(port)], settings, tmp_path, "serve.log"),
             start(["serve", "--port", str(second)], settings, tmp_path, "serve2.log")]  # a second replica
    try:
        base = f"http://127.0.0.1:{port}"
        for url in (base, f"http://127.0.0.1:{second}"):
            wait_until(functools.partial(answers, url + "/healthz"), 60, "the API did not start")

        def worker_up() -> bool:
            with get_sessionmaker(sqlite_url)() as session:
                return session.scalar(select(Worker.id)) is not None

        wait_until(worker_up, 120, "the worker did not start")
        yield settings, base + "/v1", made, f"http://127.0.0.1:{second}/v1"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def samples(url: str, key: str | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page parsed by prometheus_client's own parser: (name, sorted labels) -> value."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    page = httpx.get(url, headers=headers, timeout=30)
    assert page.status_code == 200, page.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page.text) for s in family.samples}


def client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0)


def run_to_end(api: openai.OpenAI, batch_id: str) -> openai.types.Batch:
    deadline = time.monotonic() + 120
    while (batch := api.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.3)
    return batch


def test_a_batch_through_the_openai_client(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, base, made, _ = stack
    api = client(base, made["a"])
    assert [m.id for m in api.models.list()] == [settings.model]  # what the live worker serves
    uploaded = api.files.create(file=QUESTIONS.open("rb"), purpose="batch")
    assert uploaded.bytes == QUESTIONS.stat().st_size and uploaded.filename == "questions.jsonl"
    assert api.files.content(uploaded.id).content == QUESTIONS.read_bytes()
    with pytest.raises(openai.BadRequestError, match="priority must be high, normal, low or a level 0-9"):
        api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                           extra_body={"priority": "urgent"})
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"run": "nightly"}, extra_body={"priority": "high"})
    assert batch.status == "in_progress" and batch.request_counts.total == 16  # type: ignore[union-attr]
    assert batch.model_extra and batch.model_extra["priority"] == 8
    done = run_to_end(api, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 16  # type: ignore[union-attr]
    assert done.metadata == {"run": "nightly"} and done.error_file_id is None and done.output_file_id
    lines = api.files.content(done.output_file_id).text.splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"q-{i:02d}" for i in range(1, 17)]
    for line in lines:  # the SDK's own type reads every response body
        ChatCompletion.model_validate(json.loads(line)["response"]["body"])

    # another project sees none of it; no key, a wrong key, a revoked key are refused
    other = client(base, made["b"])
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert [b.id for b in other.batches.list()] == []
    assert client(base, made["admin"]).batches.retrieve(batch.id).id == batch.id
    for key in ("gm-" + "x" * 43, made["a"][:-2] + "zz"):
        with pytest.raises(openai.AuthenticationError):
            client(base, key).batches.list()
    assert httpx.get(base + "/batches").status_code == 401
    keys.revoke(settings, "team-b")
    with pytest.raises(openai.AuthenticationError):
        other.batches.list()
    logs = (tmp_path / "serve.log").read_text()
    assert all(k not in logs for k in made.values())

    # Prometheus: the worker's counters and the server's SQL view agree with the batch's counts
    worker = samples(f"http://127.0.0.1:{(tmp_path / 'metrics_port').read_text()}/metrics", None)
    assert worker[("gristmill_items_total", (("kind", "generate"), ("model", settings.model),
                                             ("outcome", "succeeded")))] == 16
    assert worker[("gristmill_output_tokens_total", (("kind", "generate"), ("model", settings.model)))] == 16
    for histogram in ("gristmill_item_seconds_count", "gristmill_item_queue_wait_seconds_count"):
        assert worker[(histogram, (("kind", "generate"), ("model", settings.model)))] == 16, histogram
    server = samples(base.removesuffix("/v1") + "/metrics", made["admin"])
    assert server[("gristmill_batch_items_total", (("kind", "generate"), ("model", settings.model),
                                                   ("outcome", "succeeded")))] == 16
    assert server[("gristmill_workers", (("engine", "null"), ("model", settings.model)))] == 1
    assert server[("gristmill_http_requests_total", (("method", "POST"), ("route", "/v1/batches"),
                                                     ("status", "200")))] >= 1
    assert httpx.get(base.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {made['a']}"},
                     timeout=10).status_code == 403  # a project's key sees no other project's numbers


def test_validation_pagination_and_cancel(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, base, made, replica = stack
    api = client(base, made["a"])
    first = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "hi"}]}}
    bad = api.files.create(file=("bad.jsonl", json.dumps(first).encode() + b"\n{oops\n"), purpose="batch")
    failed = api.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert failed.status == "failed" and failed.errors is not None  # as OpenAI: a failed batch, not an HTTP 400
    error = failed.errors.data[0]  # type: ignore[index]
    assert (error.line, error.code) == (2, "invalid_request") and "not valid JSON" in (error.message or "")

    (settings.home / "closed").touch()  # the worker's engine holds every chunk from here
    good = api.files.create(file=QUESTIONS.open("rb"), purpose="batch")
    held = api.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
    created = [failed.id, held.id]
    for _ in range(2):
        created.append(api.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions",
                                          completion_window="24h").id)
    walked = [b.id for b in api.batches.list(limit=1)]  # the SDK follows `after` page by page
    assert walked == created[::-1]  # newest first, each exactly once
    cancelling = client(replica, made["a"]).batches.cancel(held.id)  # created through one server, cancelled
    assert cancelling.status in ("cancelling", "cancelled")          # through the other: one database
    assert api.batches.cancel(held.id).status in ("cancelling", "cancelled")  # idempotent
    (settings.home / "closed").unlink()
    done = run_to_end(api, held.id)
    assert done.status == "cancelled"
    counts = done.request_counts
    assert counts is not None and counts.total == 16 and counts.completed + counts.failed <= 16
    if counts.completed:  # chunks running at the cancel finished and kept their results
        assert len(api.files.content(done.output_file_id).text.splitlines()) == counts.completed  # type: ignore[arg-type]


def test_uploads_that_are_refused(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, base, made, _ = stack
    api = client(base, made["a"])
    with pytest.raises(openai.APIStatusError) as too_big:
        api.files.create(file=("big.jsonl", b"x" * 30_000), purpose="batch")
    assert too_big.value.status_code == 413
    auth = {"Authorization": f"Bearer {made['a']}"}
    sneaky = httpx.post(base + "/files", headers=auth, data={"purpose": "batch"},
                        files={"file": ("../../etc/x.jsonl", b"{}\n")})
    assert sneaky.status_code == 400 and sneaky.json()["error"]["param"] == "filename"
    garbled = httpx.post(base + "/files", headers={**auth, "Content-Type": "multipart/form-data; boundary=zz"},
                         content=b"--zz\r\nnot a part")
    assert garbled.status_code == 400 and set(garbled.json()["error"]) == {"message", "type", "param", "code"}
    assert api.files.list().data == []  # nothing stored
    assert sneaky.headers["x-request-id"] in (tmp_path / "serve.log").read_text()  # the log line of that request


class LosingProxy(ThreadingHTTPServer):
    """A load balancer in front of the API that passes the first batch create on but answers it 502, as
    when the API made the batch and its response was lost; every other request passes through."""

    def __init__(self, upstream: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path, headers=headers, content=body, timeout=60)
                lose = self.command == "POST" and self.path.endswith("/batches") and not proxy.lost
                proxy.lost |= lose
                status, content = (502, b"bad gateway") if lose else (answer.status_code, answer.content)
                self.send_response(status)
                self.send_header("content-type", answer.headers.get("content-type", "text/plain"))
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_DELETE = forward

            def log_message(self, *_: object) -> None:
                pass

        proxy = self
        self.lost = False
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_retried_create_makes_one_batch(stack) -> None:  # type: ignore[no-untyped-def]
    """The SDK retries a create whose answer was a 5xx; the API recognises the retry (the SDK sends no
    idempotency key, but counts its retries) and returns the batch the first attempt made."""
    _, base, made, _ = stack
    proxy = LosingProxy(base.removesuffix("/v1"))
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.server_port}/v1", api_key=made["a"], max_retries=2)
        uploaded = api.files.create(file=QUESTIONS.open("rb"), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert proxy.lost  # the first attempt made a batch and its answer was lost
        assert [b.id for b in api.batches.list()] == [batch.id]  # the retry made none
        again = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert again.id != batch.id  # a new request (no retry) is a new batch
        keyed = [api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", extra_headers={"Idempotency-Key": "nightly-1"}).id
                 for _ in range(2)]
        assert keyed[0] == keyed[1] and len(api.batches.list().data) == 3
    finally:
        proxy.shutdown()


def test_serve_refuses_a_public_address_without_keys(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "serve", "--host", "0.0.0.0", "--port",
                           str(free_port())], env=cli_env(settings), cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and "no API key exists" in proc.stderr


def test_project_limits(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Requests a minute (429 with Retry-After), bytes stored and items queued, per project, shared through SQL."""
    settings = settings_for(sqlite_url, project_requests_per_minute=9, project_stored_bytes=5_000,
                            project_queued_items=20)
    prepare_schema(sqlite_url)
    key, other = keys.create(settings, "a", "a"), keys.create(settings, "b", "b")
    port = free_port()
    proc = start(["serve", "--port", str(port)], settings, tmp_path, "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(base + "/healthz"), 60, "the API did not start")
        api = client(base + "/v1", key)
        first = api.files.create(file=("a.jsonl", b"x" * 3_000), purpose="batch")
        with pytest.raises(openai.APIStatusError) as full:  # 3,000 + 3,000 bytes pass the project's 5,000
            api.files.create(file=("b.jsonl", b"x" * 3_000), purpose="batch")
        assert full.value.status_code == 413
        api.files.delete(first.id)
        third = api.files.create(file=("c.jsonl", b"x" * 3_000), purpose="batch")  # room again
        api.files.delete(third.id)
        questions = api.files.create(file=QUESTIONS.open("rb"), purpose="batch")  # 16 lines: no worker runs them
        api.batches.create(input_file_id=questions.id, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.RateLimitError) as queue_full:  # 16 queued + 16 pass the project's 20
            api.batches.create(input_file_id=questions.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert "16 items queued" in queue_full.value.message
        assert len(api.batches.list().data) == 1  # the refused batch was not stored
        limited = None
        for _ in range(7):
            response = httpx.get(base + "/v1/files", headers={"Authorization": f"Bearer {key}"})
            if response.status_code == 429:
                limited = response
                break
        assert limited is not None, "no request was limited"
        assert httpx.get(base + "/readyz").json() == {"status": "ready"}
        assert limited.json()["error"]["type"] == "rate_limit_error" and 1 <= int(limited.headers["Retry-After"]) <= 60
        assert client(base + "/v1", other).files.list().data == []  # another project has its own count
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_not_ready_while_the_broker_is_away(sqlite_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from producer.http_api import create_app

    settings = settings_for(sqlite_url, "redis://:hunter2@127.0.0.1:1/0")
    with TestClient(create_app(settings, local=True)) as api:
        assert api.get("/healthz").status_code == 200
        answer = api.get("/readyz")
    assert answer.status_code == 503 and "broker" in answer.json() and "hunter2" not in answer.text


def test_an_endless_upload_is_refused_as_it_arrives(sqlite_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    """The app itself over ASGI, fed a multipart body that never ends and no Content-Length: it answers
    413 once the limit has passed, having read only that much (before any temporary file is written)."""
    import asyncio

    from producer.http_api import MULTIPART_ENVELOPE, create_app

    settings = settings_for(sqlite_url, max_upload_bytes=100_000)
    app = create_app(settings, local=True)
    head = (b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--zz\r\n'
            b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n')
    received, sent = [0], []

    async def receive() -> dict[str, object]:
        received[0] += 1
        return {"type": "http.request", "body": head if received[0] == 1 else b"x" * 8192, "more_body": True}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=zz")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "file_too_large"  # type: ignore[arg-type]
    assert received[0] * 8192 <= 100_000 + MULTIPART_ENVELOPE + 2 * 8192  # read no further than the limit


def test_serve_with_worker_on_the_embedded_defaults(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A laptop: no keys, SQLite and the filesystem broker, `serve --with-worker`; the SDK (which always
    sends some key) runs a batch, and stopping serve stops its worker."""
    settings = settings_for(sqlite_url)
    port = free_port()
    proc = start(["serve", "--port", str(port), "--with-worker", "--engine", HOLDING], settings, tmp_path, "serve.log")
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 60, "the API did not start")
        api = client(f"http://127.0.0.1:{port}/v1", "sk-anything")
        uploaded = api.files.create(file=QUESTIONS.open("rb"), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert run_to_end(api, batch.id).status == "completed"
        worker = psutil.Process(proc.pid).children(recursive=True)  # the worker (Celery retitles it)
        assert worker
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    assert not [(p, p.status()) for p in worker if p.is_running()]


def test_metrics_add_up_across_uvicorn_workers(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`serve --workers 2`: each process counts its own requests; /metrics (from either) shows their sum."""
    settings = settings_for(sqlite_url)
    prepare_schema(sqlite_url)
    port = free_port()
    proc = start(["serve", "--port", str(port), "--workers", "2"], settings, tmp_path, "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(base + "/healthz"), 60, "the API did not start")
        # the first process answers as soon as it is up; the requests must find both
        wait_until(lambda: (tmp_path / "serve.log").read_text().count("Started server process") == 2, 60,
                   "the second server process did not start")
        with httpx.Client() as http:  # new connections: the kernel spreads them over both processes
            for _ in range(20):
                http.get(base + "/v1/batches", headers={"Connection": "close"})
        scraped = samples(base + "/metrics", None)
        assert scraped[("gristmill_http_requests_total", (("method", "GET"), ("route", "/v1/batches"),
                                                          ("status", "200")))] == 20
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_classification_and_a_probe_through_the_openai_client(sqlite_url: str, settings_for,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    """`/v1/classify` batches from the official client, the kind's options in the body's `gristmill` field
    (the SDK's extra_body): label scoring, then a probe learned from labelled texts given inline; a bad
    option is refused with 400 and nothing stored. A real engine (transformers): the answers are the test."""
    from tests.test_probes import labelled

    settings = settings_for(sqlite_url)
    port = free_port()
    proc = start(["serve", "--port", str(port), "--with-worker", "--engine", "transformers"], settings, tmp_path,
                 "serve.log")
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 60, "the API did not start")
        api = client(f"http://127.0.0.1:{port}/v1", "sk-anything")
        reviews = labelled(slice(120, 136))  # not among the probe's training texts below
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/classify", "body": {"text": r["text"]}}
                 for i, r in enumerate(reviews)]
        uploaded = api.files.create(file=("reviews.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                    purpose="batch")

        def classify(options: dict[str, object]) -> list[dict[str, object]]:
            batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/classify",  # type: ignore[arg-type]
                                       completion_window="24h", extra_body={"gristmill": options})
            done = run_to_end(api, batch.id)
            assert done.status == "completed" and done.output_file_id, done
            return [json.loads(x) for x in api.files.content(done.output_file_id).text.splitlines()]

        scored = classify({"labels": ["positive", "negative"], "instruction": "What is the sentiment of this review?"})
        assert [x["custom_id"] for x in scored] == [f"r{i}" for i in range(len(reviews))]
        assert {x["method"] for x in scored} == {"score"}
        assert sum(x["label"] == r["label"] for x, r in zip(scored, reviews, strict=True)) >= 12
        probed = classify({"method": "probe", "train": labelled(slice(0, 60))})
        assert {x["method"] for x in probed} == {"probe"}
        assert sum(x["label"] == r["label"] for x, r in zip(probed, reviews, strict=True)) >= 14
        with pytest.raises(openai.BadRequestError) as refused:
            api.batches.create(input_file_id=uploaded.id, endpoint="/v1/classify",  # type: ignore[arg-type]
                               completion_window="24h", extra_body={"gristmill": {"method": "guess"}})
        assert refused.value.body["param"] == "gristmill" and "method" in refused.value.body["message"]  # type: ignore[index]
        assert len(api.batches.list().data) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=120)
