"""`stats` against figures computed here from timings the test wrote into SQL.

producer.stats claims nearest-rank percentiles (the smallest value with at least q% of the values at or
below it); numpy's method="inverted_cdf" is that definition, and the test also computes it by hand."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert, select, update

from producer import api, stats
from schema.db import get_sessionmaker
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, EngineBatch, Item, Result
from tests.conftest import gristmill

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
N_ITEMS = 37  # odd sizes, where nearest rank and interpolating definitions disagree
N_CALLS = 11


def nearest_rank(values: list[float], q: float) -> float:
    by_numpy = float(np.percentile(values, q, method="inverted_cdf"))
    ordered = sorted(values)
    assert by_numpy == ordered[max(1, math.ceil(q * len(ordered) / 100)) - 1]
    return by_numpy


def test_percentile_definition() -> None:
    rng = random.Random(7)
    for n in [*range(1, 45), 100, 101, 1000]:
        values = [round(rng.uniform(0, 50), 3) for _ in range(n)] + [1.5] * (n % 3)  # with ties
        for q in (1, 5, 25, 50, 75, 90, 95, 99, 100):
            assert stats.percentile(values, q) == nearest_rank(values, q), (n, q)
    assert stats.percentile([], 50) is None
    assert stats.percentile([4.0], 95) == 4.0
    assert stats.percentile([3.0, 1.0, 2.0], 0) == 1.0


def write_timings(db_url: str, settings_for: Any, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A finished batch with known timings, written straight into SQL; returns what stats must say."""
    settings = settings_for(db_url)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(N_ITEMS)))
    batch_id = api.submit(path, settings=settings).id
    rng = random.Random(42)
    sessions = get_sessionmaker(db_url)
    with sessions() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == batch_id).order_by(Item.line)))
    calls = [round(rng.uniform(0.2, 9.0), 3) for _ in range(N_CALLS)]
    chunk_tokens = [rng.randint(0, 500) for _ in range(N_CALLS)]
    hosts = [("gpu-a", "vllm", "m"), ("gpu-b", "vllm", "m"), ("cpu-c", "transformers", "m")]
    waits: list[float] = []
    starts, finishes = [], []
    prompt_tokens = completion_tokens = 0
    failed = {3, 17}
    with sessions() as session, session.begin():
        for k, engine_s in enumerate(calls):
            host, engine, model = hosts[k % len(hosts)]
            start = T0 + timedelta(seconds=5 + k)
            session.execute(insert(EngineBatch).values(
                batch_id=batch_id, worker_host=host, engine=engine, model=model, n_items=4, started_at=start,
                finished_at=start + timedelta(seconds=engine_s), engine_s=engine_s, prompt_tokens=0,
                completion_tokens=chunk_tokens[k]))
        for n, item_id in enumerate(ids):
            wait = None if n % 9 == 4 else round(rng.uniform(0.0, 30.0), 3)  # some items never recorded one
            start = T0 + timedelta(seconds=rng.uniform(2.0, 40.0))
            finish = start + timedelta(seconds=rng.uniform(0.5, 20.0))
            ok = n not in failed
            session.execute(update(Item).where(Item.id == item_id).values(
                status=ItemStatus.succeeded if ok else ItemStatus.failed, queue_wait_s=wait,
                started_at=start, finished_at=finish, engine_s=(finish - start).total_seconds(),
                tokens_per_s=rng.uniform(5, 50) if ok else None, last_error=None if ok else f"timed out {n}",
                error_code=None if ok else "timeout"))
            if wait is not None:
                waits.append(wait)
            starts.append(start)
            finishes.append(finish)
            if ok:
                p, c = rng.randint(5, 300), rng.randint(0, 256)
                prompt_tokens, completion_tokens = prompt_tokens + p, completion_tokens + c
                session.execute(insert(Result).values(
                    item_id=item_id, batch_id=batch_id, custom_id=f"d{n}", output_text="x", finish_reason="stop",
                    prompt_tokens=p, completion_tokens=c, created_at=finish))
        completed = T0 + timedelta(seconds=75.5)
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            status=BatchStatus.completed, succeeded=N_ITEMS - len(failed), failed=len(failed), created_at=T0,
            finalizing_at=completed, completed_at=completed))
    run_s = (max(finishes) - min(starts)).total_seconds()
    # The timeline: chunk k finished at 5 + k + calls[k] s after T0, the first item started at min(starts).
    ends = [(T0 + timedelta(seconds=5 + k + c) - min(starts)).total_seconds() for k, c in enumerate(calls)]
    width = next(w for w in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if w >= max(ends) / 40)
    buckets = int(max(ends) // width) + 1
    expected_timeline = {"bucket_s": float(width), "t_s": [i * width for i in range(buckets)],
                         "items": [4 * sum(1 for e in ends if int(e // width) == i) for i in range(buckets)],
                         "output_tokens": [sum(t for e, t in zip(ends, chunk_tokens) if int(e // width) == i)
                                           for i in range(buckets)]}
    expected = {
        "batch_id": batch_id, "status": "completed", "items": N_ITEMS, "succeeded": N_ITEMS - len(failed),
        "failed": len(failed), "wall_s": 75.5, "run_s": run_s,
        "queue_wait_s": {"p50": nearest_rank(waits, 50), "p95": nearest_rank(waits, 95),
                         "p99": nearest_rank(waits, 99), "max": max(waits)},
        "engine_call_s": {"p50": nearest_rank(calls, 50), "p95": nearest_rank(calls, 95),
                          "p99": nearest_rank(calls, 99), "max": max(calls)},
        "engine_calls": N_CALLS, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "output_tokens_per_s": completion_tokens / run_s, "prompt_tokens_per_s": prompt_tokens / run_s,
        "total_tokens": prompt_tokens + completion_tokens, "truncated_items": 0, "truncated_tokens": 0,
        "total_tokens_per_s": (prompt_tokens + completion_tokens) / run_s,
        "items_per_s": N_ITEMS / run_s, "workers": [{"host": h, "engine": e, "model": m} for h, e, m in hosts],
        "errors": [{"code": "timeout", "count": 2, "examples": [{"custom_id": "d3", "message": "timed out 3"},
                                                                  {"custom_id": "d17", "message": "timed out 17"}]}],
        "histograms": {"queue_wait_s": numpy_histogram(waits), "engine_call_s": numpy_histogram(calls)},
        "timeline": expected_timeline,
    }
    # The definition matters for these values: an interpolating percentile would give another answer.
    assert float(np.percentile(waits, 95)) != expected["queue_wait_s"]["p95"]  # type: ignore[index]
    assert float(np.percentile(calls, 50, method="lower")) == expected["engine_call_s"]["p50"]  # type: ignore[index]
    return batch_id, expected


def numpy_histogram(values: list[float]) -> dict[str, list[Any]]:
    counts, edges = np.histogram(values, bins=stats.HISTOGRAM_BINS)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(actual["workers"], key=str) == sorted(expected["workers"], key=str)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key == "histograms":
            for name, histogram in value.items():
                assert actual[key][name]["counts"] == histogram["counts"], name
                assert actual[key][name]["edges"] == pytest.approx(histogram["edges"], rel=1e-9), name
        elif key in ("timeline", "errors"):  # exact: counts, and round bucket widths
            assert actual[key] == value, key
        elif isinstance(value, dict | float):
            assert actual[key] == pytest.approx(value, rel=1e-9), key
        elif key != "workers":
            assert actual[key] == value and type(actual[key]) is type(value), key


def test_stats_of_known_timings(db_url: str, settings_for, tmp_path: Path) -> None:
    batch_id, expected = write_timings(db_url, settings_for, tmp_path)
    with get_sessionmaker(db_url)() as session:
        same(stats.summarise(session, batch_id), expected)
    proc = gristmill("stats", batch_id, "--json", settings=settings_for(db_url), cwd=tmp_path)
    same(json.loads(proc.stdout), expected)


def test_stats_text_and_empty_batch(sqlite_url: str, settings_for, tmp_path: Path) -> None:
    """The text form, and a batch nothing has run yet (no percentiles, no rates), neither crashes."""
    settings = settings_for(sqlite_url)
    batch_id, expected = write_timings(sqlite_url, settings_for, tmp_path)
    text = gristmill("stats", batch_id, settings=settings, cwd=tmp_path).stdout
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()}
    spread = expected["queue_wait_s"]
    assert lines["queue_wait_s"] == (f"p50 {spread['p50']:.3f}  p95 {spread['p95']:.3f}  p99 {spread['p99']:.3f}  "
                                     f"max {spread['max']:.3f}")
    assert lines["errors"] == "timeout 2"
    assert lines["engine_calls"] == str(N_CALLS) and lines["run_s"] == f"{expected['run_s']:.2f}"

    path = tmp_path / "fresh.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    fresh = api.submit(path, settings=settings).id
    summary = json.loads(gristmill("stats", fresh, "--json", settings=settings, cwd=tmp_path).stdout)
    assert summary["queue_wait_s"] == {"p50": None, "p95": None, "p99": None, "max": None}
    assert summary["timeline"]["t_s"] == [] and summary["histograms"]["engine_call_s"]["counts"] == []
    assert (summary["run_s"], summary["output_tokens_per_s"], summary["wall_s"]) == (None, None, None)
    assert summary["status"] == "in_progress" and summary["engine_calls"] == 0
    assert "queue_wait_s" in gristmill("stats", fresh, settings=settings, cwd=tmp_path).stdout


def test_stats_plot_and_charts(sqlite_url: str, settings_for, tmp_path: Path) -> None:
    """`stats --plot` writes an image of the four charts; each chart's SVG carries its data series."""
    from xml.etree import ElementTree

    from PIL import Image

    from producer import charts

    settings = settings_for(sqlite_url)
    batch_id, expected = write_timings(sqlite_url, settings_for, tmp_path)
    gristmill("stats", batch_id, "--plot", "stats.png", settings=settings, cwd=tmp_path)
    with Image.open(tmp_path / "stats.png") as image:
        assert image.format == "PNG" and image.size == (1100, 680)
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 50  # drawn, not blank
    with get_sessionmaker(sqlite_url)() as session:
        summary = stats.summarise(session, batch_id)
    svg = ElementTree.fromstring(charts.svg(summary, "items_per_s"))
    series = svg.find(".//{http://www.w3.org/2000/svg}g[@id='data-items_per_s']")
    assert series is not None
    path = series.find(".//{http://www.w3.org/2000/svg}path")
    assert path is not None and path.get("d", "").count("L") >= len(expected["timeline"]["t_s"])
    histogram = ElementTree.fromstring(charts.svg(summary, "engine_time"))
    assert histogram.find(".//{http://www.w3.org/2000/svg}g[@id='data-engine_time']") is not None
