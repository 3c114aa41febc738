"""The HTTP API under load, and what uploading through it costs against submitting in-process.

Load: `--clients` concurrent clients (one httpx pool, loopback only) against a real `gristmill serve`, each
creating a batch from a small uploaded file, retrieving it twice and listing batches once, over and over
for `--seconds`; a `gristmill worker` on the no-inference engine runs the batches meanwhile. Reports
requests/s, p50/p99 latency per route, 4xx, 5xx (target: none) and transport errors.
Upload: a `--lines` chat batch file through the API (POST /v1/files, then POST /v1/batches, which
validates and stores the whole batch before it answers) against `Service.submit` of the same file
in-process, in interleaved rounds (which goes first alternates): seconds of each and the ratio api/direct
(target: <= 1.2).
Project limits are off and the upload limit large: the API is measured, not its limits.
    python -m bench.api [--seconds 60] [--clients 100] [--lines 50000] [--repeats 3] [--serve-workers 1]
                        [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from bench.services import REPO, env_for, fresh_services, stop_tree, wait_for, worker_process
from producer import keys
from producer.service import Service
from schema.db import prepare_schema
from schema.lines import CHAT_URL
from schema.settings import Settings

NULL_ENGINE = "bench.null_engine:NullEngine"
LIMITS_OFF = {"project_requests_per_minute": 0, "project_queued_items": 0, "project_stored_bytes": 0,
              "max_upload_bytes": 2**40}
ROUTES = ("create", "retrieve", "list")


class Sample(NamedTuple):
    route: str
    seconds: float
    status: int | None  # None: a transport error (refused, reset, timed out)


def write_batch(path: Path, n: int, model: str) -> Path:
    """n OpenAI chat batch lines, about 200 bytes each, the same every run."""
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": model, "max_tokens": 32, "messages": [
                {"role": "user", "content": f"Summarise document {i} in one short sentence."}]}
            line = {"custom_id": f"req-{i:06d}", "method": "POST", "url": CHAT_URL, "body": body}
            f.write(json.dumps(line) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_process(settings: Settings, workers: int, log: Path) -> Iterator[str]:
    """A real `gristmill serve` on loopback; yields its base URL once /healthz answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", str(workers)],
                                env=env_for(settings), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gristmill serve exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        return False

    try:
        wait_for(healthy, timeout=120, what="gristmill serve answering /healthz", poll_s=0.2)
        yield base
    finally:
        stop_tree(proc)


async def timed(http: httpx.AsyncClient, samples: list[Sample], route: str, method: str, url: str,
                **kwargs: Any) -> Any:
    """The response's JSON when it is a 200, else None; every request's latency and status recorded."""
    began = time.perf_counter()
    try:
        response = await http.request(method, url, **kwargs)
    except httpx.TransportError:
        samples.append(Sample(route, time.perf_counter() - began, None))
        return None
    samples.append(Sample(route, time.perf_counter() - began, response.status_code))
    return response.json() if response.status_code == 200 else None


async def client(http: httpx.AsyncClient, file_id: str, deadline: float, samples: list[Sample]) -> None:
    create = {"input_file_id": file_id, "endpoint": CHAT_URL, "completion_window": "24h"}
    while time.monotonic() < deadline:
        batch = await timed(http, samples, "create", "POST", "/v1/batches", json=create)
        for _ in range(2 if batch else 0):
            await timed(http, samples, "retrieve", "GET", f"/v1/batches/{batch['id']}")
        await timed(http, samples, "list", "GET", "/v1/batches", params={"limit": 5})


async def measure_load(base: str, key: str, small: Path, clients: int, seconds: float) -> dict[str, Any]:
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        uploaded = await http.post("/v1/files", files={"file": (small.name, small.read_bytes())},
                                   data={"purpose": "batch"})
        uploaded.raise_for_status()
        file_id, began, deadline = uploaded.json()["id"], time.perf_counter(), time.monotonic() + seconds
        await asyncio.gather(*(client(http, file_id, deadline, samples) for _ in range(clients)))
        elapsed = time.perf_counter() - began  # to the last client's last request, past the deadline
    routes = {route: summarise([s for s in samples if s.route == route], elapsed) for route in ROUTES}
    return {"clients": clients, "seconds": elapsed, **summarise(samples, elapsed), "routes": routes}


def summarise(samples: list[Sample], elapsed: float) -> dict[str, Any]:
    ms = sorted(s.seconds * 1000 for s in samples) or [float("nan")]
    statuses = [s.status for s in samples]
    return {"requests": len(samples), "requests_per_s": len(samples) / elapsed,
            "p50_ms": ms[len(ms) // 2], "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "status_4xx": sum(1 for s in statuses if s is not None and 400 <= s < 500),
            "status_5xx": sum(1 for s in statuses if s is not None and s >= 500),
            "transport_errors": statuses.count(None)}


def via_api(http: httpx.Client, path: Path) -> tuple[float, float]:
    """Seconds to upload and create the batch, and of those the upload's."""
    began = time.perf_counter()
    with open(path, "rb") as f:  # httpx streams the multipart body from the open file
        uploaded = http.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "batch"})
    uploaded.raise_for_status()
    upload_s = time.perf_counter() - began
    created = http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": CHAT_URL,
                                             "completion_window": "24h"})
    created.raise_for_status()
    seconds = time.perf_counter() - began
    if created.json()["status"] == "failed":  # an invalid file is stored as a failed batch: not the same work
        raise RuntimeError(f"the API refused {path}: {created.json()['errors']}")
    return seconds, upload_s


def direct(service: Service, path: Path) -> float:
    began = time.perf_counter()
    batch_id = service.submit(path, endpoint=CHAT_URL, check_workers=False, record_invalid=True)
    seconds = time.perf_counter() - began
    if (info := service.status(batch_id)).status == "failed":
        raise RuntimeError(f"submit refused {path}: {info.errors}")
    return seconds


def measure_upload(settings: Settings, base: str, key: str, big: Path, repeats: int) -> dict[str, Any]:
    service = Service(settings)
    runs: dict[str, list[float]] = {"direct": [], "api": [], "api_upload": []}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        # Warm this process's connections and code paths, as the server's are, and grow the items table:
        # every large submit runs ANALYZE items, slower on a larger table until its sample is full.
        direct(service, big)
        for round_ in range(repeats):  # interleaved, the first of each round alternating, so that load
            for path in ("direct", "api") if round_ % 2 == 0 else ("api", "direct"):  # and growth hit both
                if path == "direct":
                    runs["direct"].append(direct(service, big))
                else:
                    api_s, upload_s = via_api(http, big)
                    runs["api"].append(api_s)
                    runs["api_upload"].append(upload_s)
    ratios = [a / d for a, d in zip(runs["api"], runs["direct"], strict=True)]
    spread = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "per_round": v}
              for name, v in runs.items()}
    return {"bytes": big.stat().st_size, **spread,
            "api/direct": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                           "per_round": ratios}}


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with fresh_services(workdir, max_items_per_batch=max(args.lines, 100_000), **LIMITS_OFF) as settings:
        prepare_schema(settings.database_url)
        key = keys.create(settings, "bench", "bench")  # with a key every request is verified, as deployed
        small = write_batch(workdir / "small.jsonl", 4, settings.model)
        big = write_batch(workdir / "big.jsonl", args.lines, settings.model)
        with serve_process(settings, args.serve_workers, workdir / "serve.log") as base:
            with worker_process(settings, NULL_ENGINE, workdir / "worker.log"):
                load = asyncio.run(measure_load(base, key, small, args.clients, args.seconds))
            # The worker is stopped first: running the big batches would load the machine under the clocks.
            upload = measure_upload(settings, base, key, big, args.repeats)
    return {"load": {**load, "serve_workers": args.serve_workers}, "upload": {"lines": args.lines, **upload}}


def report_table(report: dict[str, Any]) -> None:
    load, upload = report["load"], report["upload"]
    print(f"\nload: {load['clients']} clients for {load['seconds']:.1f} s, "
          f"{load['serve_workers']} serve worker(s); {report['machine']}")
    print(f"{'route':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'4xx':>6} {'5xx':>6} "
          f"{'transport':>9}")
    for name, row in [*load["routes"].items(), ("all", load)]:
        print(f"{name:<10} {row['requests']:>9} {row['requests_per_s']:>8.1f} {row['p50_ms']:>8.1f} "
              f"{row['p99_ms']:>8.1f} {row['status_4xx']:>6} {row['status_5xx']:>6} "
              f"{row['transport_errors']:>9}")
    print(f"\nupload: {upload['lines']} lines ({upload['bytes'] / 2**20:.1f} MiB), "
          f"{len(upload['api']['per_round'])} interleaved round(s)")
    print(f"{'path':<18} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, label in (("direct", "direct"), ("api", "api"), ("api_upload", "  of which upload")):
        row = upload[name]
        print(f"{label:<18} {row['median_s']:>9.2f} {row['min_s']:>7.2f} {row['max_s']:>7.2f}")
    ratio = upload["api/direct"]
    print(f"api/direct median {ratio['median']:.3f}, range {ratio['min']:.3f}-{ratio['max']:.3f} "
          f"(target <= 1.2); 5xx under load: {load['status_5xx']} (target 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="how long the clients run")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--lines", type=int, default=50_000, help="lines of the uploaded file")
    parser.add_argument("--repeats", type=int, default=3, help="upload rounds, direct and API interleaved")
    parser.add_argument("--serve-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--workdir", type=Path, help="keep files and logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(
            prefix="gristmill-api-") as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        command = re.sub(r" --workdir[= ]\S+", "", " ".join(["python -m bench.api", *sys.argv[1:]]))  # local
        machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        report = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "command": command, "machine": machine,
                  **measure(args, Path(tmp))}
    report_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
