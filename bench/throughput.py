"""Throughput, side by side, on the same prompts, model, sampling parameters and vLLM engine arguments.

  (a) bare vllm.LLM.generate over every prompt at once (the ceiling)
  (b) vllm run-batch on the same requests as an OpenAI batch file
  (c) gristmill end to end on Redis + PostgreSQL, one `gristmill worker`
  (d) the naive pattern: a Celery task per document, each calling generate on one prompt (a subset)
  (e) gristmill on the embedded defaults (`gristmill run`)

Every run is its own process, one at a time, in rounds (a b c d e, a b c d e, ...); every engine gets
ENGINE_ARGS, is warmed with the same 1-token request and has its prefix cache emptied before its clock
starts. What each clock covers is in bench/README.md. Exits non-zero, after the table and the JSON, when
a run's per-request output tokens differ from (a)'s or an engine did not run with the arguments asked.
    python -m bench.throughput [--quick] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import prompts
from bench.services import REPO, env_for, fresh_services, stop_tree, wait_for, worker_process
from schema.settings import Settings
from worker.engines.vllm_engine import CPU_BLOCK_SIZE, vllm_dtype

RUNS = {
    "a": "bare vllm.LLM.generate, all at once",
    "b": "vllm run-batch",
    "c": "gristmill, Redis + PostgreSQL, 1 worker",
    "d": "naive: Celery task per document",
    "e": "gristmill run (embedded defaults)",
}
RATIOS = [("c", "a"), ("c", "b"), ("c", "d"), ("e", "a")]


def engine_args() -> dict[str, Any]:
    """The vLLM engine arguments of every run, explicit so that no run gets another default."""
    args: dict[str, Any] = {"dtype": vllm_dtype(), "max_model_len": 2048, "max_num_seqs": 256,
                            "max_num_batched_tokens": 4096}
    if not torch.cuda.is_available():  # no CUDA graphs to capture; 32-token KV blocks as gristmill uses
        args.update(enforce_eager=True, block_size=CPU_BLOCK_SIZE)
    return args


def cli_flags(args: dict[str, Any]) -> list[str]:
    """The same arguments as vLLM command-line flags."""
    flags: list[str] = []
    for key, value in args.items():
        flag = key.replace("_", "-")
        flags += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return flags


@dataclass
class Setup:
    lines: list[dict[str, Any]]
    batch: Path
    folder: Path
    engine: dict[str, Any]
    naive_n: int
    prompt_tokens: dict[str, int]  # per custom_id: the same prompts in every run, counted once


def rates(result: dict[str, Any], prompt_tokens: dict[str, int]) -> dict[str, Any]:
    """A run's rates over its clock: output tokens/s (what the ratios compare), prompt, total, items."""
    prompt = sum(prompt_tokens[custom_id] for custom_id in result["tokens"])
    seconds = result["seconds"]
    return {"prompt_tokens": prompt, "tokens_per_s": result["output_tokens"] / seconds,
            "prompt_tokens_per_s": prompt / seconds, "total_tokens_per_s": (prompt + result["output_tokens"]) / seconds,
            "items_per_s": result["requests"] / seconds}


def _json_result(cmd: list[str], workdir: Path) -> dict[str, Any]:
    """Run a measuring script; it writes its figures to $BENCH_RESULT (vLLM logs to stdout)."""
    result = workdir / "result.json"
    env = {**os.environ, "BENCH_RESULT": str(result), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def _logged_options(text: str) -> dict[str, Any] | None:
    """The effective engine options VLLMEngine logs once it is ready."""
    match = re.search(r"vLLM engine ready: (\{.*\})", text)
    return json.loads(match[1]) if match else None


def _check_alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Raise once a worker has exited (its engine died, or it was killed) rather than wait for it."""
    if proc.poll() is not None:
        raise RuntimeError(f"the worker exited ({proc.returncode}):\n{log.read_text(errors='replace')[-2000:]}")


def run_bare(s: Setup, workdir: Path) -> dict[str, Any]:
    return _json_result([sys.executable, "-m", "bench.bare_vllm", str(s.batch), str(workdir / "out.jsonl"),
                         "--model-folder", str(s.folder), "--engine-args", json.dumps(s.engine)], workdir)


def run_vllm_batch(s: Setup, workdir: Path) -> dict[str, Any]:
    return _json_result([sys.executable, "-m", "bench.run_batch_timed", "-i", str(s.batch), "-o",
                         str(workdir / "out.jsonl"), "--model", str(s.folder), *cli_flags(s.engine),
                         "--disable-log-stats", "--served-model-name", Settings().model], workdir)


def run_gristmill_distributed(s: Setup, workdir: Path) -> dict[str, Any]:
    """From just before `submit` until the batch's `completed_at` in SQL: the time of the transaction
    that made its last results durable (not when polling noticed it)."""
    from sqlalchemy import select

    from producer import api
    from schema.db import get_sessionmaker
    from schema.queue import make_app
    from schema.tables import Batch, Result, Worker

    log = workdir / "worker.log"
    with fresh_services(workdir, vllm_options=s.engine) as settings, worker_process(settings, "vllm", log) as proc:
        sessions = get_sessionmaker(settings.database_url)

        def registered() -> int | None:  # the worker has loaded and warmed its engine, and says its capacity
            _check_alive(proc, log)
            try:
                with sessions() as session:
                    return session.scalar(select(Worker.max_num_seqs))
            except Exception:  # noqa: BLE001  # the worker has not created the tables yet
                return None

        wait_for(lambda: registered() is not None, 900, "the worker registering")
        app = make_app(settings)
        wait_for(lambda: bool(app.control.ping(timeout=0.5)), 120, "the worker answering a ping")
        began = time.time()
        handle = api.submit(s.batch, settings=settings)
        info = handle.wait(poll_s=0.05, timeout=7200, on_progress=lambda _: _check_alive(proc, log))
        with sessions() as session:
            done = session.scalar(select(Batch.completed_at).where(Batch.id == handle.id))
            tokens = {cid: n for cid, n in session.execute(select(Result.custom_id, Result.completion_tokens)
                                                           .where(Result.batch_id == handle.id))}
        seqs = registered()
    if done is None:
        raise RuntimeError(f"batch {handle.id} ended {info.status}")
    done = done if done.tzinfo else done.replace(tzinfo=UTC)
    engine = {**(_logged_options(log.read_text(errors="replace")) or {}), "workers_table_max_num_seqs": seqs}
    return {"requests": info.request_counts.total, "failed": info.request_counts.failed,
            "output_tokens": sum(tokens.values()), "seconds": done.timestamp() - began, "engine": engine,
            "tokens": tokens}


def run_naive(s: Setup, workdir: Path) -> dict[str, Any]:
    """From the first task sent until the last result is back, after the worker has loaded its engine."""
    import redis

    from bench import naive_celery

    lines = s.lines[:s.naive_n]
    env = env_for(Settings(vllm_options=s.engine))
    env["NAIVE_BROKER_URL"] = naive_celery.BROKER
    redis.Redis.from_url(naive_celery.BROKER).flushdb()
    with open(workdir / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.naive_celery", "worker", "-P", "solo",
                                 "--loglevel", "WARNING"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        engine = naive_celery.engine_options.delay().get(timeout=900)  # loaded and warmed; no generate
        began = time.perf_counter()
        results = [naive_celery.generate.delay(line["body"]["messages"], line["body"]["max_tokens"]) for line in lines]
        for r in results:
            while not r.ready():
                _check_alive(proc, workdir / "worker.log")
                time.sleep(0.05)
        outputs = [r.get() for r in results]
        seconds = time.perf_counter() - began
    finally:
        stop_tree(proc)
    tokens = {line["custom_id"]: o["completion_tokens"] for line, o in zip(lines, outputs, strict=True)}
    return {"requests": len(lines), "output_tokens": sum(tokens.values()), "seconds": seconds, "engine": engine,
            "tokens": tokens}


def run_embedded(s: Setup, workdir: Path) -> dict[str, Any]:
    """`gristmill run`'s wall clock (submit, in-process worker, results file) minus its engine start; the
    engine stops after the results file is written, outside the clock (reported)."""
    settings = Settings(database_url=f"sqlite:///{workdir / 'gristmill.db'}", home=workdir / ".gristmill",
                        vllm_options=s.engine)
    summary_path, out = workdir / "summary.json", workdir / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "run", str(s.batch), "-o", str(out),
                           "--engine", "vllm", "--summary-json", str(summary_path), "-v"],  # -v: its engine log
                          env=env_for(settings), cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gristmill run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    tokens = prompts.output_tokens(out)
    return {"requests": summary["items"], "failed": summary["failed"], "output_tokens": sum(tokens.values()),
            "seconds": summary["wall_s"] - summary["engine_start_s"], "engine_start_s": summary["engine_start_s"],
            "engine_stop_s": summary["engine_stop_s"],  # after the results are written: outside wall_s
            "engine": _logged_options(proc.stderr + proc.stdout), "tokens": tokens}


STEPS: dict[str, Callable[[Setup, Path], dict[str, Any]]] = {
    "a": run_bare, "b": run_vllm_batch, "c": run_gristmill_distributed, "d": run_naive, "e": run_embedded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 requests instead of 512")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--naive-requests", type=int, help="(d) runs the first N requests (default 64, quick 32)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every run, interleaved")
    parser.add_argument("--runs", default="abcde", help="which runs, e.g. 'ac'")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep each finished run here; the same command again with the "
                        "same folder resumes after the last finished run (default: a temporary folder)")
    args = parser.parse_args()
    n = args.requests or (64 if args.quick else 512)
    lines = prompts.build(n)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from worker.models import prepare

    engine = engine_args()
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in args.runs}
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(
            prefix="gristmill-bench-") as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        folder = prepare(Settings().model, Settings().cache_dir)
        setup = Setup(lines, prompts.write(lines, Path(tmp) / "batch.jsonl"), folder, engine,
                      min(n, args.naive_requests or (32 if args.quick else 64)), prompts.prompt_tokens(lines, folder))
        same = json.dumps({"lines": lines, "naive_n": setup.naive_n, "engine": engine}, sort_keys=True)
        if (Path(tmp) / "setup.json").exists() and (Path(tmp) / "setup.json").read_text() != same:
            sys.exit(f"{tmp} holds runs of other requests or engine arguments: give another --workdir")
        (Path(tmp) / "setup.json").write_text(same)
        for round_ in range(args.repeats):
            for key in args.runs:
                print(f"round {round_ + 1}/{args.repeats}: ({key}) {RUNS[key]} ...", file=sys.stderr, flush=True)
                workdir = Path(tmp) / f"{key}{round_}"
                if (workdir / "run.json").exists():  # finished by an earlier invocation with this --workdir
                    runs[key].append(json.loads((workdir / "run.json").read_text()))
                    continue
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir()
                load = os.getloadavg()[0]
                try:
                    result = STEPS[key](setup, workdir)
                except (RuntimeError, TimeoutError) as exc:  # a shared machine: once more, then give up
                    print(f"({key}) failed, running it again: {str(exc)[-1500:]}", file=sys.stderr, flush=True)
                    workdir = workdir.with_name(workdir.name + "-again")
                    shutil.rmtree(workdir, ignore_errors=True)
                    workdir.mkdir()
                    result = {**STEPS[key](setup, workdir), "attempts": 2}
                if result.get("errors") or result.get("failed"):
                    raise RuntimeError(f"run ({key}) had failed requests: {result}")
                runs[key].append({**result, **rates(result, setup.prompt_tokens), "load_1m": load})
                (Path(tmp) / f"{key}{round_}" / "run.json").write_text(json.dumps(runs[key][-1]))
            report = _report(args, setup, runs)
            if args.json:  # after every round, so that a run killed late keeps the rounds before
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2))
    _print(report)
    if report["problems"]:
        sys.exit(1)


def _report(args: argparse.Namespace, s: Setup, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    command = re.sub(r" --workdir[= ]\S+", "", " ".join(["python -m bench.throughput", *sys.argv[1:]]))  # a local path
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "command": command,
            "requests": len(s.lines), "naive_requests": s.naive_n, "repeats": len(next(iter(runs.values()))),
            "machine": _machine(), "engine_args": s.engine,
            "runs": {k: [{x: v for x, v in run.items() if x != "tokens"} for run in rs] for k, rs in runs.items()},
            "ratios": _ratios(runs),
            "problems": _check_tokens(runs, s.lines, s.naive_n) + _check_engines(runs, s.engine)}


def _check_tokens(runs: dict[str, list[dict[str, Any]]], lines: list[dict[str, Any]], naive_n: int) -> list[str]:
    """Every run's per-request output tokens equal (a)'s (the first run's when (a) is not run)."""
    reference = (runs.get("a") or next(iter(runs.values())))[0]["tokens"]
    problems = []
    for key, results in runs.items():
        wanted = {line["custom_id"] for line in (lines[:naive_n] if key == "d" else lines)}
        for round_, result in enumerate(results, 1):
            tokens = result["tokens"]
            differ = sorted(cid for cid in wanted if tokens.get(cid) != reference.get(cid))
            if differ:
                problems.append(f"({key}) round {round_}: output tokens of {len(differ)} of {len(wanted)} "
                                f"requests differ from the reference, e.g. {differ[:3]}")
    return problems


def _check_engines(runs: dict[str, list[dict[str, Any]]], asked: dict[str, Any]) -> list[str]:
    """Every engine ran with the limits asked (as vLLM reports them back)."""
    problems = []
    for key, results in runs.items():
        for round_, result in enumerate(results, 1):
            got = result.get("engine") or {}
            wrong: dict[str, Any] = {k: got.get(k) for k in ("max_num_seqs", "max_num_batched_tokens", "block_size", "enforce_eager",
                                             "max_model_len") if k in asked and got.get(k) != asked[k]}
            if got.get("workers_table_max_num_seqs", asked["max_num_seqs"]) != asked["max_num_seqs"]:
                wrong["workers_table_max_num_seqs"] = got["workers_table_max_num_seqs"]
            if wrong:
                problems.append(f"({key}) round {round_}: the engine ran with {wrong}, not as asked")
    return problems


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each ratio per round (runs of the same round paired), with its median and range."""
    ratios = {}
    for x, y in RATIOS:
        if x in runs and y in runs:
            values = [rx["tokens_per_s"] / ry["tokens_per_s"] for rx, ry in zip(runs[x], runs[y], strict=True)]
            ratios[f"{x}/{y}"] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                  "per_round": values}
    return ratios


def _machine() -> str:
    import vllm

    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = next((name for flag, name in [("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
                if f" {flag}" in cpu), "")
    return (f"{platform.machine()}, {os.cpu_count()} cores ({isa or 'CPU flags unknown'}), "
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
            f"Python {platform.python_version()}, vLLM {vllm.__version__}")


def _print(report: dict[str, Any]) -> None:
    print(f"\n{report['requests']} requests ((d): the first {report['naive_requests']}), "
          f"{report['repeats']} interleaved rounds; {report['machine']}")
    print(f"engine arguments, every run: {json.dumps(report['engine_args'])}")
    print(f"{'run':<46} {'requests':>8} {'prompt tok':>10} {'out tok':>8} {'median s':>9} {'items/s':>8} "
          f"{'prompt tok/s':>12} {'total tok/s':>11}  output tokens/s per round (median)")
    for key, results in report["runs"].items():
        per_round = [r["tokens_per_s"] for r in results]

        def median(name: str, results: list[dict[str, Any]] = results) -> float:
            return statistics.median(r[name] for r in results)

        print(f"({key}) {RUNS[key]:<42} {results[0]['requests']:>8} {results[0]['prompt_tokens']:>10} "
              f"{results[0]['output_tokens']:>8} {median('seconds'):>9.1f} {median('items_per_s'):>8.2f} "
              f"{median('prompt_tokens_per_s'):>12.0f} {median('total_tokens_per_s'):>11.0f}  "
              f"{' '.join(f'{v:.1f}' for v in per_round)} ({statistics.median(per_round):.1f})")
    for name, ratio in report["ratios"].items():
        note = "  (rates: (d) ran the first requests only)" if name == "c/d" else ""
        print(f"{name:<5} median {ratio['median']:.3f}, range {ratio['min']:.3f}-{ratio['max']:.3f}{note}")
    loads = [r["load_1m"] for results in report["runs"].values() for r in results]
    print(f"1-minute load average at the runs' starts: {min(loads):.1f}-{max(loads):.1f}")
    reference = "(a)'s" if "a" in report["runs"] else "the first run's"
    print("\n".join(report["problems"]) or f"every run's per-request output tokens equal {reference}; every engine "
          "ran with the arguments asked")


if __name__ == "__main__":
    main()
