"""Where log lines go. Services (`worker`, `serve`, `beat`) log everything to the console, as a service
manager expects. Commands a person runs (`run`, `submit`, `status`, ...) keep the terminal for what they
asked: gristmill's own warnings and errors; everything else (vLLM's and Celery's INFO lines, library
warnings, progress bars of model loading) goes to a log file, GRISTMILL_LOG_FILE or
<GRISTMILL_HOME>/gristmill.log. `-v` brings it all back to the terminal.

GRISTMILL_LOG_FORMAT=json makes every line (console and file, vLLM's too) one JSON object for log
shippers: time, level, logger, message, and the fields a line carries (batch_id, chunk_id, worker,
items, engine_s, request_id, ...), through python-json-logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
OWN = ("gristmill", "producer", "worker", "schema")  # the loggers whose warnings a user should see
_command_log: dict[str, object] = {}  # for_command's log file and terminal handler, for quiet_descriptors


def formatter(log_format: str = "text") -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES)
    return logging.Formatter(FORMAT)


def for_service(log_format: str = "text") -> None:
    console = logging.StreamHandler()
    console.setFormatter(formatter(log_format))
    logging.basicConfig(level=logging.INFO, handlers=[console], force=True)


def for_command(home: Path, verbose: bool, log_format: str = "text") -> Path | None:
    """Log to a file, the terminal keeping gristmill's warnings and errors; with `verbose`, everything to
    the terminal. Returns the log file, if one is used."""
    if verbose:
        for_service(log_format)
        return None
    path = Path(os.environ.get("GRISTMILL_LOG_FILE") or home / "gristmill.log")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:  # a folder we may not write: the log lines are lost, the command still runs
        print(f"warning: cannot write the log file {path} ({exc.strerror}); set GRISTMILL_LOG_FILE", file=sys.stderr)
        to_file = logging.NullHandler()
    to_file.setFormatter(formatter(log_format))
    to_terminal = logging.StreamHandler()
    to_terminal.setLevel(logging.WARNING)
    to_terminal.addFilter(lambda record: record.name.split(".")[0] in OWN)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_terminal], force=True)
    _command_log.update(path=path, terminal=to_terminal)
    logging.captureWarnings(True)  # library warnings (Celery's as root, torch's deprecations) to the file
    # Read when vLLM is first imported (lazily, by the engine) and by its engine process: its log lines
    # go to the same file from both; the engine process's deprecation warnings are not shown.
    if isinstance(to_file, logging.FileHandler):
        os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(_vllm_config(path, log_format)))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return path


def _vllm_config(log_file: Path, log_format: str) -> Path:
    """A logging dictConfig for vLLM's loggers that appends to the log file."""
    plain: dict[str, object] = {"format": FORMAT} if log_format != "json" else {
        "()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS, "rename_fields": JSON_NAMES}
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"plain": plain},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "plain"}},
              "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}}}
    path = log_file.with_name("vllm-logging.json")
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@contextlib.contextmanager
def quiet_descriptors() -> Iterator[None]:
    """While an engine runs inside a command (`gristmill run`): what anything writes straight to file
    descriptors 1 and 2 (vLLM's engine process, Triton's and C++ warnings, a progress bar of weights
    loading, Celery's shutdown notice) goes to a file beside the log file (gristmill.log: gristmill.out;
    the log keeps log records only, one per line); gristmill's own output keeps the terminal through
    sys.stdout and sys.stderr, pointed at copies of the original descriptors. Without a log file (-v),
    nothing changes."""
    path, terminal = _command_log.get("path"), _command_log.get("terminal")
    if not isinstance(path, Path) or not isinstance(terminal, logging.StreamHandler):
        yield
        return
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    log_fd = os.open(path.with_suffix(".out"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding=streams[0].encoding)
    sys.stderr = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=streams[1].encoding)
    terminal.setStream(sys.stderr)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        yield
    finally:
        copies = sys.stdout, sys.stderr
        for stream in copies:
            stream.flush()
        sys.stdout, sys.stderr = streams
        terminal.setStream(sys.stderr)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        for stream in copies:
            stream.close()
