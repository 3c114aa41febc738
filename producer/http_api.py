"""The HTTP API: OpenAI's Files and Batches endpoints, so any OpenAI SDK submits work and reads it back.

A thin layer over the service core (producer.service) and the files in SQL (producer.files). Every
request carries `Authorization: Bearer KEY` (producer.keys); a key sees its project's files and
batches only (another project's id is 404), an admin key sees all. With no key created yet the API
serves one person on 127.0.0.1 without keys (`gristmill serve` refuses any other address then).
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Output and error files
are rendered from SQL when downloaded, streamed: `file-output-<batch id>`, `file-errors-<batch id>`.
"""

import functools
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from producer import api_metrics, dashboard, files, keys, quotas
from producer.service import Service
from schema import kinds, workers
from schema.batch_object import BatchObject
from schema.db import utcnow
from schema.errors import BatchNotFound, BatchStateError, GristmillError, InputError
from schema.kinds.classify import CLASSIFY_ENDPOINT
from schema.kinds.embed import EMBEDDINGS_URL
from schema.lines import CHAT_URL, COMPLETIONS_URL
from schema.queue import parse_priority
from schema.settings import Settings, get_settings, redact

log = logging.getLogger("gristmill.api")
KIND_OF_ENDPOINT = {CHAT_URL: "generate", COMPLETIONS_URL: "generate", EMBEDDINGS_URL: "embed",
                    CLASSIFY_ENDPOINT: "classify"}
OUTPUT, ERRORS = "file-output-", "file-errors-"
UPLOAD_PIECE = 1 << 20
MULTIPART_ENVELOPE = 64 << 10  # room for the multipart boundaries, part headers and the purpose field
IDEMPOTENCY_KEY_CHARS = 120
IDEMPOTENCY_KEYS_KEPT = timedelta(days=1)
SDK_RETRIES_WITHIN = timedelta(minutes=10)  # the SDK's retries of one call end within seconds
LOCAL_ENV = "GRISTMILL_SERVE_LOCAL"  # set by `gristmill serve` when bound to a loopback address


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


@dataclass(frozen=True)
class Caller:
    project: str | None  # None: every project (an admin key, or no keys on a laptop)
    home: str  # where its files and batches are created
    key: str  # the API key's name ("" without keys)


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    # gristmill's own: the task kind's options, as the CLI's flags and a schedule's task give them (for
    # /v1/classify: labels, instruction, method, probe, train, ...); the SDKs send it as extra_body.
    gristmill: dict[str, Any] | None = None
    priority: str | int = "normal"  # gristmill's: high, normal, low or 0-9 (9 most urgent); extra_body too


class UploadLimit:
    """413 for an upload past the size limit while its bytes arrive, before Starlette spools the multipart
    body to a temporary file: at once when its Content-Length says so, else when the bytes received pass
    it. (producer.files enforces the exact limit on the file itself; this bounds the multipart envelope.)"""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit + MULTIPART_ENVELOPE

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/files"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse()(scope, receive, send)
        received = 0

        async def counting() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised inside the body's parsing: FastAPI passes HTTPException on
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting, send)

    def _refuse(self) -> JSONResponse:
        return _error(413, self._message(), code="file_too_large")

    def _message(self) -> str:
        return f"the upload is larger than {self.limit - MULTIPART_ENVELOPE} bytes (GRISTMILL_MAX_UPLOAD_BYTES)"


def create_app(settings: Settings, local: bool = False) -> FastAPI:
    """The API over these settings; `local`: bound to 127.0.0.1, where requests need no key for as long
    as no key exists (one person's laptop)."""
    app = FastAPI(title="gristmill", docs_url=None, redoc_url=None)
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes)
    service = Service(settings)

    def identify(key: str) -> Caller | None:
        """Who sends this API key; None for no valid key."""
        if local and not keys.any_live(settings):  # any key or none: an SDK always sends one
            return Caller(None, "default", "")
        found = keys.verify(settings, key) if key else None
        return None if found is None else Caller(None if found.admin else found.project, found.project, found.name)

    def caller(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        who = identify(header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else "")
        if who is None:
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                           "invalid_request_error", code="invalid_api_key")
        _within(lambda: quotas.count_request(settings, who.home))
        return who

    Who = Annotated[Caller, Depends(caller)]

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Any:
        """Every response and log line carries a request id (the caller's X-Request-Id, else a new one);
        every request is counted and timed by its route (its template: no ids in metric labels)."""
        rid = request.headers.get("x-request-id", "")[:64] or f"req_{uuid.uuid4().hex[:16]}"
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        elapsed = time.perf_counter() - started
        log.info("%s %s %s -> %d in %.1f ms", rid, request.method, request.url.path, response.status_code,
                 elapsed * 1000, extra={"request_id": rid, "method": request.method, "path": request.url.path,
                                        "status": response.status_code, "duration_ms": round(elapsed * 1000, 2)})
        route = getattr(request.scope.get("route"), "path", "unmatched")
        api_metrics.REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        api_metrics.REQUEST_SECONDS.labels(request.method, route).observe(elapsed)
        return response

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus: this API's requests (every uvicorn worker's) and the mill's state from SQL and the
        broker. An admin key's, once keys exist (counts span projects)."""
        if caller(request).project is not None:
            raise ApiError(403, "/metrics needs an admin key", code="admin_key_required")
        return Response(api_metrics.exposition(settings, service.queue), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.message, exc.type, exc.param, exc.code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:  # a body that does not parse, 404, 405
        return _error(exc.status_code, str(exc.detail), code="file_too_large" if exc.status_code == 413 else None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return _error(400, f"{param or 'request'}: {first['msg']}", param=param)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready when the database answers and the broker takes a connection."""
        checks: dict[str, Callable[[], object]] = {
            "database": lambda: service.list_batches(limit=1),
            "broker": lambda: _connect(service.queue),
        }
        for name, check in checks.items():
            try:
                check()
            except Exception as exc:  # noqa: BLE001  # any failure means not ready; say which service
                return JSONResponse({"status": "unavailable", name: redact(str(exc))[:200]}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.post("/v1/files")
    def upload(who: Who, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict[str, Any]:
        # Starlette has spooled the multipart body to a temporary file; it goes to SQL a piece at a time.
        pieces = iter(lambda: file.file.read(UPLOAD_PIECE), b"")
        room = _within(lambda: quotas.room_to_store(settings, who.home))
        try:
            stored = files.store(settings, who.home, file.filename or "upload.jsonl", pieces, purpose, room)
        except files.FileTooLarge as exc:
            raise ApiError(413, str(exc), code="file_too_large") from exc
        except InputError as exc:
            raise ApiError(400, exc.message, param=exc.path) from exc
        return _file(stored)

    @app.get("/v1/files")
    def list_files(who: Who, limit: int = 100) -> dict[str, Any]:
        return _page([_file(f) for f in files.list_files(settings, who.project, min(max(limit, 1), 10_000))])

    @app.get("/v1/files/{file_id}")
    def get_file(who: Who, file_id: str) -> dict[str, Any]:
        if file_id.startswith((OUTPUT, ERRORS)):
            return _rendered(who, file_id)
        return _file(_found(lambda: files.info(settings, who.project, file_id)))

    @app.get("/v1/files/{file_id}/content")
    def file_content(who: Who, file_id: str) -> StreamingResponse:
        if file_id.startswith((OUTPUT, ERRORS)):
            _rendered(who, file_id)
            return StreamingResponse(_lines(who, file_id), media_type="application/jsonl")
        chunks = _found(lambda: files.content(settings, who.project, file_id))
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(who: Who, file_id: str) -> dict[str, Any]:
        _found(lambda: files.remove(settings, who.project, file_id))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    def create_batch(who: Who, body: CreateBatch, request: Request) -> dict[str, Any]:
        kind = KIND_OF_ENDPOINT.get(body.endpoint)
        if kind is None:
            raise ApiError(400, f"endpoint {body.endpoint!r} is not supported; use one of "
                                f"{', '.join(KIND_OF_ENDPOINT)}", param="endpoint")
        if body.completion_window != "24h":
            raise ApiError(400, "completion_window must be 24h", param="completion_window")
        request_key, since = _request_key(who, body, request.headers)
        mine = service.scoped(who.project)
        if since is not None and (earlier := mine.find_request(request_key, since)):
            return _batch(mine.status(earlier))  # a retry whose first attempt made the batch (its answer was lost)
        options = body.gristmill or {}
        _found(lambda: parse_priority(body.priority), param="priority")
        _found(lambda: kinds.get(kind).spec(**options), param="gristmill")  # a bad option: 400, nothing stored
        stored = _found(lambda: files.info(settings, who.project, body.input_file_id), param="input_file_id")
        view = service.scoped(stored.project)
        admit = functools.partial(quotas.check_queued, settings, stored.project)  # 429 past the project's queue
        batch_id = _within(lambda: _found(lambda: view.submit(
            files.content(settings, stored.project, stored.id), name=stored.id, task=kind, metadata=body.metadata,
            endpoint=body.endpoint, record_invalid=True, request_key=request_key, admit=admit,
            priority=body.priority, **options)))
        return _batch(view.status(batch_id))

    @app.get("/v1/batches")
    def list_batches(who: Who, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        view = service.scoped(who.project)
        page = _found(lambda: view.list_batches(min(max(limit, 1), 100) + 1, after), param="after")
        return _page([_batch(b) for b in page[:limit]], has_more=len(page) > limit)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(who: Who, batch_id: str) -> dict[str, Any]:
        return _batch(_found(lambda: service.scoped(who.project).status(batch_id)))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(who: Who, batch_id: str) -> dict[str, Any]:
        view = service.scoped(who.project)
        info = _found(lambda: view.status(batch_id))
        if info.status in ("cancelling", "cancelled"):  # idempotent
            return _batch(info)
        try:
            return _batch(view.cancel(batch_id))
        except BatchStateError as exc:
            raise ApiError(409, str(exc)) from exc

    @app.get("/v1/models")
    def models(who: Who) -> dict[str, Any]:
        live = sorted(workers.live_models(settings))
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "gristmill"}
                                           for m in live]}

    def _rendered(who: Caller, file_id: str) -> dict[str, Any]:
        batch_id = file_id.removeprefix(OUTPUT).removeprefix(ERRORS)
        info = _found(lambda: service.scoped(who.project).status(batch_id))
        counts = info.request_counts
        return {"id": file_id, "object": "file", "bytes": 0, "created_at": info.created_at,
                "filename": f"{batch_id}_{'output' if file_id.startswith(OUTPUT) else 'errors'}.jsonl",
                "purpose": "batch_output", "status": "processed", "expires_at": None, "status_details": None,
                "request_counts": counts.model_dump()}

    def _lines(who: Caller, file_id: str) -> Iterator[bytes]:
        wanted_ok = file_id.startswith(OUTPUT)
        batch_id = file_id.removeprefix(OUTPUT).removeprefix(ERRORS)
        for record in service.scoped(who.project).output(batch_id):
            if record.ok == wanted_ok:
                yield record.line.model_dump_json().encode() + b"\n"

    app.include_router(dashboard.router(settings, service, identify))
    app.add_exception_handler(dashboard.SignIn, dashboard.sign_in_handler)
    return app


def _request_key(who: Caller, body: CreateBatch, headers: Any) -> tuple[str, datetime | None]:
    """What a retry of this create is known by, and since when to look for its first attempt (None: this
    is no retry). An Idempotency-Key header holds for a day. Without one, the caller's key and the body's
    digest, looked up only on a retry: OpenAI's SDKs send no idempotency key but count their retries in
    x-stainless-retry-count, so a first attempt always creates and only a retry returns an earlier batch."""
    given = headers.get("idempotency-key")
    if given is not None:
        if not 0 < len(given) <= IDEMPOTENCY_KEY_CHARS:
            raise ApiError(400, f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_CHARS} characters",
                           param="Idempotency-Key")
        return f"key:{given}", utcnow() - IDEMPOTENCY_KEYS_KEPT
    digest = hashlib.sha256(f"{who.key}\n{body.model_dump_json()}".encode()).hexdigest()
    retried = headers.get("x-stainless-retry-count", "0") not in ("", "0")
    return f"body:{digest}", utcnow() - SDK_RETRIES_WITHIN if retried else None


def _found(call: Any, param: str | None = None) -> Any:
    """The call's result; 404 in OpenAI's shape for what the caller's project does not hold."""
    try:
        return call()
    except (files.FileNotFound, BatchNotFound) as exc:
        raise ApiError(404, str(exc), param=param, code="not_found") from exc
    except quotas.OverLimit:
        raise  # _within's to answer (429)
    except GristmillError as exc:
        raise ApiError(400, str(exc), param=param) from exc


def _connect(queue: Any) -> None:
    with queue.connection() as conn:
        conn.ensure_connection(max_retries=1)


def _within(call: Any) -> Any:
    """The call's result; 429 with Retry-After when a project's limit is reached."""
    try:
        return call()
    except quotas.OverLimit as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        raise ApiError(429, str(exc), "rate_limit_error" if exc.retry_after_s else "insufficient_quota",
                       code="rate_limit_exceeded", headers=headers) from exc


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _file(info: files.FileInfo) -> dict[str, Any]:
    return {"id": info.id, "object": "file", "bytes": info.bytes, "created_at": int(info.created_at.timestamp()),
            "filename": info.filename, "purpose": info.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


def _batch(info: BatchObject) -> dict[str, Any]:
    """OpenAI's batch object (explicit nulls where OpenAI sends them)."""
    counts = info.request_counts
    done = info.status in ("completed", "cancelled", "expired")
    return {
        "id": info.id, "object": "batch", "endpoint": info.endpoint, "model": info.model,
        "errors": {"object": "list", "data": info.errors} if info.errors else None,
        "input_file_id": info.input_file, "completion_window": info.completion_window, "status": info.status,
        "output_file_id": OUTPUT + info.id if done and counts.completed else None,
        "error_file_id": ERRORS + info.id if done and counts.failed else None,
        "created_at": info.created_at, "in_progress_at": info.in_progress_at, "expires_at": info.expires_at,
        "finalizing_at": info.finalizing_at, "completed_at": info.completed_at, "failed_at": info.failed_at,
        "expired_at": info.expired_at, "cancelling_at": info.cancelling_at, "cancelled_at": info.cancelled_at,
        "request_counts": counts.model_dump(), "metadata": info.metadata or None, "priority": info.priority,
    }


def _page(data: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more and bool(data)}


def app_from_env() -> FastAPI:
    """The app uvicorn's workers build (`gristmill serve --workers N`), from GRISTMILL_* settings."""
    settings = get_settings()
    return create_app(settings, local=os.environ.get(LOCAL_ENV) == "1")
