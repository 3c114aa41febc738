"""The `gristmill` command: a thin layer over the Python API (producer.api) and the worker service."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy.exc import DBAPIError, OperationalError

from producer import api, logs, schedule_cli
from producer.progress import Progress, render
from schema import kinds
from schema.errors import GristmillError, InputError
from schema.kinds.flags import add_spec_flags, spec_values
from schema.settings import Settings, get_settings, redact

SPECS = {name: (kind.spec_model, kind.file_flags) for name, kind in kinds.KINDS.items()}


def _job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="OpenAI batch JSONL, or simple JSONL lines {custom_id|id, text}")
    p.add_argument("--task", choices=list(kinds.KINDS), default="generate",
                   help="; ".join(f"{name}: {kind.summary}" for name, kind in kinds.KINDS.items()))
    p.add_argument("--model", help="registry name, Hugging Face folder or GGUF file (default: GRISTMILL_MODEL)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--completion-window", default="24h", help="the batch expires after this long (e.g. 24h, 90m)")
    p.add_argument("--priority", default="normal",
                   help="high, normal, low or 0-9 (9 most urgent): workers take chunks of more urgent batches first")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="compute every item, even one whose identical request was answered before")
    add_spec_flags(p, SPECS)


def _export_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-o", "--output", required=required, help="results file")
    p.add_argument("--errors", help="failed items go here (default: inline in the output, with their error)")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gristmill", description="Batch LLM jobs with results in SQL.")
    sub = root.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="all in one, no servers: submit, run in this process, export")
    _job_flags(run)
    _export_flags(run)
    run.add_argument("--engine", help="auto (default), vllm, transformers, or module:Class")
    run.add_argument("--summary-json", help="also write the closing summary to this file, for scripts")
    _quiet_flag(run)
    worker = sub.add_parser("worker", help="a Celery worker with the engine loaded once")
    worker.add_argument("--model")
    worker.add_argument("--engine", help="auto (default), vllm, transformers, or module:Class")
    worker.add_argument("--task", choices=list(kinds.KINDS),
                        help="load the engine for this task where it matters (vLLM embeds with its pooling "
                             "runner, which serves only embed); the worker serves every task its engine can")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (/metrics)")
    submit = sub.add_parser("submit", help="validate, store and enqueue a file; prints the batch id")
    _job_flags(submit)
    submit.add_argument("--wait", action="store_true", help="show the progress until the batch ends")
    _quiet_flag(submit)
    status = sub.add_parser("status", help="one batch, or a table of recent ones")
    status.add_argument("batch_id", nargs="?")
    status.add_argument("--wait", action="store_true", help="show the progress until the batch ends")
    _quiet_flag(status)
    status.add_argument("--json", action="store_true", help="OpenAI-style batch object(s)")
    status.add_argument("--limit", type=int, default=20)
    results = sub.add_parser("results", help="export results in input order")
    results.add_argument("batch_id")
    _export_flags(results)
    cancel = sub.add_parser("cancel", help="cancel a batch: queued items stop, finished results stay")
    cancel.add_argument("batch_id")
    stats = sub.add_parser("stats", help="timing summary of a batch")
    stats.add_argument("batch_id")
    stats.add_argument("--json", action="store_true", help="every figure, with the charts' histograms and timeline")
    stats.add_argument("--plot", metavar="FILE", help="also draw the charts into FILE (.png, .svg or .pdf)")
    evaluate = sub.add_parser("eval", help="score a classification batch against gold labels; stored, shown by stats")
    evaluate.add_argument("batch_id")
    evaluate.add_argument("--gold", required=True, help='JSONL lines {"custom_id" or "id", "label"} '
                                                         '(multi-label: "labels": [...])')
    evaluate.add_argument("--json", action="store_true", help="every figure, with per-label and calibration bins")
    sub.add_parser("probes", help="classifiers learned from labelled texts (--method probe): ids and metrics")
    models = sub.add_parser("models", help="model cache").add_subparsers(dest="action", required=True)
    prepare = models.add_parser("prepare", help="convert a model once into the local cache")
    prepare.add_argument("name", nargs="?")
    sub.add_parser("reconcile", help="requeue what SQL says should run but no message carries; expire batches")
    serve = sub.add_parser("serve", help="the HTTP API: OpenAI's Files and Batches endpoints under /v1")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument("--with-worker", action="store_true",
                       help="also run a gristmill worker, started and stopped with the API (one machine, no setup)")
    serve.add_argument("--model", help="--with-worker: the worker's model")
    serve.add_argument("--engine", help="--with-worker: the worker's engine")
    keys = sub.add_parser("keys", help="API keys of the HTTP API").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="a new key; printed once, stored hashed")
    create.add_argument("--name", required=True)
    create.add_argument("--project", default="default", help="the key sees only this project's files and batches")
    create.add_argument("--admin", action="store_true", help="the key sees every project")
    keys.add_parser("list", help="every key (never the key itself)")
    revoke = keys.add_parser("revoke", help="a revoked key is refused from now on")
    revoke.add_argument("name")
    schedule_cli.add_commands(sub)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply Alembic migrations")
    _verbose_flag(root)
    return root


def _quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display, for scripts")


def _verbose_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """-v on every command, before or after its name (a command's own says nothing unless given)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="every log line on the terminal (a command's go to GRISTMILL_LOG_FILE otherwise)")
    for action in parser._subparsers._group_actions if parser._subparsers else []:  # argparse lists them nowhere public
        for child in getattr(action, "choices", {}).values():
            _verbose_flag(child, top=False)


def _metadata(pairs: list[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise GristmillError(f"--metadata expects KEY=VALUE, got {bad[0]!r}")
    return dict(p.split("=", 1) for p in pairs)


def _submit(args: argparse.Namespace, settings: Settings, check_workers: bool = True, send: bool = True) -> api.BatchHandle:
    model, file_flags = SPECS[args.task]
    options = spec_values(args, args.task, model, file_flags, SPECS)
    return api.submit(args.input, task=args.task, model=args.model, metadata=_metadata(args.metadata),
                      completion_window=args.completion_window, settings=settings, check_workers=check_workers,
                      cache=args.cache, priority=args.priority, send=send, **options)


def _wait(handle: api.BatchHandle, quiet: bool) -> Any:
    model = handle.status().model
    with Progress(quiet=quiet) as progress:
        def show(info: Any) -> None:
            idle = info.request_counts.completed + info.request_counts.failed == 0 and not info.done
            progress.phase(f"waiting for a worker that runs {model} (gristmill worker --model {model})"
                           if idle and handle.service.waiting_for_worker(model) else None)
            progress.update(info, handle.service.recent_rates(handle.id))

        return handle.wait(on_progress=show)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.service import serve

    started = time.perf_counter()
    # Validated and stored now (a bad line fails before the model loads); enqueued once the worker below
    # has registered its engine's capacity, so chunks are cut to fit it (not to a fallback size).
    handle = _submit(args, settings, check_workers=False, send=False)
    model = args.model or settings.model
    if not args.quiet:
        print(f"batch {handle.id}", file=sys.stderr)
    with logs.quiet_descriptors(), Progress(quiet=args.quiet) as progress:
        progress.phase(f"loading {model} ({args.engine or 'auto'} engine)")

        written: dict[str, Any] = {}  # the results, written as soon as the batch is done: before the engine stops

        def finished() -> bool:  # polled once the engine has loaded and the worker runs
            info = handle.status()
            progress.update(info, handle.service.recent_rates(handle.id))
            if not info.done:
                progress.phase(None)  # the engine has loaded: the progress bar replaces the phase line
            elif not written:
                progress.phase("writing results")
                try:
                    written["counts"] = handle.results(args.output, args.errors, args.format)
                except Exception as exc:  # noqa: BLE001  # raised below, once the engine has stopped
                    written["error"] = exc
                written["wall"] = time.perf_counter() - started
                progress.phase("stopping the engine")
            return info.done

        rt = serve(settings, model=args.model, engine=args.engine, task=args.task, loglevel="INFO",  # to the log file
                   stop_when=finished, on_ready=lambda: handle.service.send(handle.id))
    if "error" in written:
        raise written["error"]
    info = handle.status()
    counts = written["counts"] if written else handle.results(args.output, args.errors, args.format)  # interrupted
    wall = written["wall"] if written else time.perf_counter() - started
    summary = handle.stats()
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(
            {**summary, "wall_s": wall, "engine_start_s": rt.engine_start_s, "engine_stop_s": rt.engine_stop_s,
             "engine": rt.engine.name}, indent=2))
    print(summary_line(info.status, summary, counts, wall, rt.engine_start_s) + f"; results in {args.output}",
          file=sys.stderr)
    if summary.get("calibration_warning"):
        print(f"warning: {summary['calibration_warning']}", file=sys.stderr)
    return 0 if info.status == "completed" else 1


def summary_line(status: str, summary: dict[str, Any], counts: Any, wall: float, engine_start_s: float) -> str:
    """`completed: 16 items, 16 succeeded, 0 failed in 41.3 s (engine start 30.2 s, processing 9.8 s);
    tokens: 812 prompt (82.9/s), 634 output (64.7/s), 1446 total (147.6/s), 1.63 items/s`: rates over
    the processing time."""
    run_s = summary["run_s"] or 0.0
    per_s = (lambda n: f"{n / run_s:.1f}/s") if run_s else (lambda n: "-/s")
    return (f"{status}: {summary['items']} items, {counts.succeeded} succeeded, {counts.failed} failed in "
            f"{wall:.1f} s (engine start {engine_start_s:.1f} s, processing {run_s:.1f} s); tokens: "
            f"{summary['prompt_tokens']} prompt ({per_s(summary['prompt_tokens'])}), "
            f"{summary['completion_tokens']} output ({per_s(summary['completion_tokens'])}), "
            f"{summary['total_tokens']} total ({per_s(summary['total_tokens'])}), "
            f"{per_s(summary['succeeded'] + summary['failed']).removesuffix('/s')} items/s")


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.service import serve

    print(f"gristmill worker: broker {redact(settings.broker_url)}, database {redact(settings.database_url)}",
          file=sys.stderr)
    serve(settings, model=args.model, engine=args.engine, task=args.task, loglevel=args.loglevel,
          metrics_port=args.metrics_port)
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    handle = _submit(args, settings)
    print(handle.id)
    if handle.service.waiting_for_worker(args.model):
        print(f"note: no live worker runs model {args.model or settings.model!r} yet; the batch waits in the queue "
              f"until one starts (gristmill worker)", file=sys.stderr)
    if args.wait:
        return 0 if _wait(handle, args.quiet).status == "completed" else 1
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if args.batch_id is None:
        batches = api.list_batches(args.limit, settings)
        if args.json:
            print(json.dumps([b.model_dump() for b in batches], indent=2))
        else:
            print(f"{'id':<40} {'status':<12} {'done':>13} {'failed':>7} {'elapsed':>9}  model")
            for b in batches:
                c = b.request_counts
                print(f"{b.id:<40} {b.status:<12} {f'{c.completed + c.failed}/{c.total}':>13} {c.failed:>7} "
                      f"{b.elapsed_s or 0:>8.1f}s  {b.model}")
        return 0
    handle = api.open_batch(args.batch_id, settings)
    info = _wait(handle, args.quiet) if args.wait else handle.status()
    if args.json:
        print(info.model_dump_json(indent=2))
    else:
        print(render(info, handle.service.recent_rates(handle.id)))
    return 0


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    counts = api.open_batch(args.batch_id, settings).results(args.output, args.errors, args.format)
    print(f"{counts.succeeded} succeeded, {counts.failed} failed, {counts.pending} not finished; "
          f"written to {args.output}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    info = api.open_batch(args.batch_id, settings).cancel()
    print(info.status)
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    summary = api.open_batch(args.batch_id, settings).stats()
    if args.plot:
        from producer import charts

        charts.plot(summary, args.plot)
        print(f"charts written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if key in ("histograms", "timeline", "calibration_warning", "evaluation"):  # series; the last two: below
            continue
        if key == "errors":
            value = "  ".join(f"{e['code']} {e['count']}" for e in value) or "none"
        elif isinstance(value, dict):
            value = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.2f}"
        print(f"{key:<20} {value}")
    if summary.get("calibration_warning"):
        print(f"warning: {summary['calibration_warning']}")
    if summary.get("evaluation"):
        print(f"{'evaluation':<20} {evaluation_line(summary['evaluation'])}")
        _console().print(confusion_table(summary["evaluation"]))
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    result = api.open_batch(args.batch_id, settings).evaluate(args.gold)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = _console()
    console.print(evaluation_line(result))
    console.print(per_label_table(result), confusion_table(result))
    return 0


def _console() -> Console:
    """Tables on stdout as they are: labels and file names are not rich markup, numbers not highlighted."""
    return Console(soft_wrap=True, markup=False, highlight=False)


def evaluation_line(result: dict[str, Any]) -> str:
    """`accuracy 0.867  macro-F1 0.861  ECE 0.074: 27 items against gold.jsonl; 3 items without a gold label,
    2 gold ids not in the batch, 0 without an answer`."""
    figures = "  ".join(f"{name} {value:.3f}" if value is not None else f"{name} -" for name, value in (
        ("accuracy" + (" (exact set)" if result["multi_label"] else ""), result["accuracy"]),
        ("macro-F1", result["macro_f1"]), ("ECE", result["ece"])))
    return (f"{figures}: {result['matched']} items against {result['gold_file']}; {result['missing_gold']} items "
            f"without a gold label, {result['unknown_ids']} gold ids not in the batch, {result['unanswered']} "
            f"without an answer")


def per_label_table(result: dict[str, Any]) -> Table:
    table = Table("label", *(Column(name, justify="right") for name in ("precision", "recall", "F1", "support")),
                  title="per label")
    for row in result["per_label"]:
        table.add_row(row["label"], *(f"{row[k]:.3f}" for k in ("precision", "recall", "f1")), str(row["support"]))
    return table


def confusion_table(result: dict[str, Any]) -> Table:
    """Single-label: gold rows, predicted columns; multi-label: one row per label, its own yes/no counts."""
    labels, matrix = result["labels"], result["confusion_matrix"]
    if result["multi_label"]:
        table = Table("label", *(Column(name, justify="right") for name in ("TP", "FP", "FN", "TN")),
                      title="confusion per label")
        for label, ((tn, fp), (fn, tp)) in zip(labels, matrix, strict=True):
            table.add_row(label, str(tp), str(fp), str(fn), str(tn))
        return table
    table = Table("gold \\ predicted", *(Column(label, justify="right") for label in labels), title="confusion matrix")
    for label, row in zip(labels, matrix, strict=True):
        table.add_row(label, *map(str, row))
    return table


def cmd_probes(args: argparse.Namespace, settings: Settings) -> int:
    from schema.db import get_sessionmaker, prepare_schema
    from schema.probes import listed

    prepare_schema(settings.database_url)
    print(f"{'id':<30} {'model':<28} {'layer':>5} {'examples':>8} {'cv accuracy':>11}  {'learned':<16}  labels")
    with get_sessionmaker(settings.database_url)() as session:
        for probe in listed(session):
            metrics = probe.metrics or {}
            accuracy = f"{metrics['cv_accuracy']:.3f}" if "cv_accuracy" in metrics else "-"
            learned = f"{probe.trained_at:%Y-%m-%d %H:%M}" if probe.trained_at else "not yet"
            print(f"{probe.id:<30} {probe.model:<28} {probe.layer or '-':>5} {len(probe.training):>8} "
                  f"{accuracy:>11}  {learned:<16}  {','.join(probe.labels)}")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from worker.models import prepare

    print(prepare(args.name or settings.model, settings.cache_dir))
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from schema.errors import BrokerError
    from schema.queue import Queue
    from worker.reconciler import reconcile_all

    try:
        report = reconcile_all(settings, Queue(settings))
    except (OperationalError, RedisConnectionError, OSError) as exc:  # the broker is away: one line, no traceback
        raise BrokerError(f"cannot reach the broker {redact(settings.broker_url)}: {type(exc).__name__}: "
                          f"{redact(str(exc))}") from exc
    print(f"{len(report.expired_batches)} batches expired, {report.leases_expired} dead leases returned, "
          f"{report.requeued} items requeued", file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from schema.db import upgrade

    upgrade(settings.database_url)
    print(f"database {redact(settings.database_url)} is at the latest schema", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import ipaddress
    import os

    import uvicorn

    from producer import http_api, keys
    from schema.db import prepare_schema

    prepare_schema(settings.database_url)
    local = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    keyed = keys.any_live(settings)
    if not local and not keyed:
        raise GristmillError(f"no API key exists: create one (gristmill keys create --name NAME) before serving on "
                             f"{args.host}; without keys the API serves 127.0.0.1 only")
    os.environ[http_api.LOCAL_ENV] = "1" if local else "0"  # read by each uvicorn worker's app
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # their request metrics, shared
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gristmill-metrics-")
    print(f"gristmill API on http://{args.host}:{args.port}/v1 ({'keys required' if keyed else 'no key needed until one exists'}); "
          f"database {redact(settings.database_url)}", file=sys.stderr)
    worker = _worker_process(args) if args.with_worker else None
    # uvicorn re-raises the SIGTERM it handled once it has shut down: exit through `finally`, not die there
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:  # uvicorn's access log is off: the API logs every request itself, with its request id
        uvicorn.run("producer.http_api:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="info", access_log=False, timeout_graceful_shutdown=30)
    finally:
        if worker is not None:
            worker.terminate()  # a warm shutdown: running chunks finish or go back to the queue
            worker.wait(timeout=120)
    return 0


def _worker_process(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """`gristmill worker` next to the API, on the same settings (its own process: Celery and vLLM want
    a main thread); its log lines go where the API's go."""
    options = [*(["--model", args.model] if args.model else []), *(["--engine", args.engine] if args.engine else [])]
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "WARNING", *options])


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from producer import keys
    from schema.db import prepare_schema

    prepare_schema(settings.database_url)
    if args.action == "create":
        print(keys.create(settings, args.name, args.project, args.admin))
    elif args.action == "revoke":
        keys.revoke(settings, args.name)
        print(f"key {args.name!r} revoked", file=sys.stderr)
    else:
        print(f"{'name':<24} {'project':<24} {'admin':<6} {'created':<20} revoked")
        for key in keys.list_keys(settings):
            revoked = f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-"
            print(f"{key.name:<24} {key.project:<24} {'yes' if key.admin else 'no':<6} "
                  f"{key.created_at:%Y-%m-%d %H:%M}{'':<4} {revoked}")
    return 0


COMMANDS = {"run": cmd_run, "worker": cmd_worker, "submit": cmd_submit, "status": cmd_status,
            "results": cmd_results, "cancel": cmd_cancel, "stats": cmd_stats, "eval": cmd_eval, "probes": cmd_probes,
            "models": cmd_models, "db": cmd_db, "reconcile": cmd_reconcile, "keys": cmd_keys, "serve": cmd_serve,
            "beat": schedule_cli.cmd_beat,
            "schedule": lambda args, settings: schedule_cli.cmd_schedule(args, settings, _worker_until)}


def _worker_until(settings: Settings, model: str | None, done: Callable[[], bool]) -> object:
    from worker.service import serve

    return serve(settings, model=model, loglevel="INFO", stop_when=done)


SERVICES = {"worker", "serve", "beat"}  # long-running: they log to the console, for a service manager


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:  # a GRISTMILL_* variable that does not parse: say which, one line each
        for error in exc.errors():
            where = f"GRISTMILL_{str(error['loc'][0]).upper()}: " if error["loc"] else ""
            print(f"error: {where}{error['msg']} (got {error['input']!r})" if where else f"error: {error['msg']}",
                  file=sys.stderr)
        return 2
    if args.command in SERVICES:
        logs.for_service(settings.log_format)
    else:
        logs.for_command(settings.home, args.verbose, settings.log_format)
    try:
        return COMMANDS[args.command](args, settings)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (GristmillError, TimeoutError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except DBAPIError as exc:  # the database is away or refuses us: one line, not a driver's traceback
        if not (exc.connection_invalidated or isinstance(exc, OperationalError)):
            raise
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"error: cannot reach the database at {redact(settings.database_url)}: {redact(reason)} "
              f"(is it running? check GRISTMILL_DATABASE_URL)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
