"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver, installed by
.ci/setup) through Selenium, against a real `gristmill serve --with-worker` (the no-inference engine: the
subject is the dashboard) holding a finished batch of one project.

Screenshots go to the test's folder, and to GRISTMILL_SCREENSHOTS when set (the README's come from there).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from sqlalchemy import func, select

from producer import keys
from producer.scheduler import Scheduler
from producer.schedules import load
from producer.service import Service
from schema.db import get_sessionmaker, prepare_schema
from schema.settings import Settings
from schema.states import ItemStatus
from schema.tables import Item, ScheduleRun, Worker
from tests.test_http_api import answers, free_port, start, wait_until

PACED = "tests.fault_engine:PacedEngine"  # 300 items in about 2 s: charts with a shape
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    assert CHROMIUM and DRIVER, "chromium and chromium-driver are missing: run .ci/setup (it installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, folder: Path, name: str) -> None:
    """The whole page, as tall as its content."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(600, min(int(height) + 40, 4000)))
    for where in (folder, os.environ.get("GRISTMILL_SCREENSHOTS")):
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(Path(where) / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def console_errors(driver: webdriver.Chrome) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def sign_in(driver: webdriver.Chrome, base: str, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/")
    assert driver.current_url == base + "/login"  # no key yet: the sign-in page
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    wait_until(lambda: driver.current_url == base + "/", 10, "sign-in did not lead to the batches")


def run_a_schedule(settings: Settings, tmp_path: Path) -> ScheduleRun:
    """A manual run of a schedule over 12 files, run by the server's worker; returns the finished run."""
    for n in range(12):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{n}.txt").write_text(f"document {n}")
    (tmp_path / "schedules.toml").write_text(
        '[[schedule]]\nname = "digest"\ncron = "0 6 * * *"\nsource = { glob = "docs/*.txt" }\n'
        'task = { kind = "generate", max_tokens = 8 }\n')
    scheduler = Scheduler(Service(settings), load(tmp_path / "schedules.toml"))
    run = scheduler.fire(scheduler.schedules["digest"], datetime.now(UTC), manual=True)
    assert run is not None and run.batch_id is not None
    wait_until(lambda: Service(settings).status(str(run.batch_id)).done, 60, "the schedule's batch did not end")
    return scheduler.finish(run.id)


def test_dashboard_in_a_browser(sqlite_url: str, settings_for, tmp_path: Path, browser: webdriver.Chrome) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url, reconcile_interval_s=1)
    prepare_schema(sqlite_url)
    key_a, key_b = keys.create(settings, "team-a", "a"), keys.create(settings, "team-b", "b")
    admin = keys.create(settings, "ops", "ops", admin=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(["serve", "--port", str(port), "--with-worker", "--engine", PACED], settings, tmp_path, "serve.log")
    try:
        wait_until(lambda: answers(base + "/healthz"), 60, "the API did not start")
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": settings.model, "messages": [{"role": "user", "content": f"question {i}"}],
                           **({"stream": True} if i % 50 == 7 else {})}} for i in range(300)]
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        api = openai.OpenAI(base_url=base + "/v1", api_key=key_a, max_retries=0)
        uploaded = api.files.create(file=(tmp_path / "in.jsonl").open("rb"), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        busiest = (0, 0.0)  # the workers table while the batch runs: (chunks in flight, engine busy fraction)
        while (status := api.batches.retrieve(batch.id).status) not in ("completed", "failed"):
            with get_sessionmaker(sqlite_url)() as session:
                for chunks, busy in session.execute(select(Worker.chunks_in_flight, Worker.busy_fraction)):
                    busiest = (max(busiest[0], chunks), max(busiest[1], busy or 0.0))
            time.sleep(0.2)
        assert status == "completed"
        assert busiest[0] >= 1 and busiest[1] > 0.5, busiest  # PacedEngine steps without pause: busy most of the time
        with get_sessionmaker(sqlite_url)() as session:
            counts = dict(session.execute(select(Item.status, func.count()).where(Item.batch_id == batch.id)
                                          .group_by(Item.status)).all())
        assert counts == {ItemStatus.succeeded: 294, ItemStatus.failed: 6}

        sign_in(browser, base, key_a)
        row = browser.find_element(By.CSS_SELECTOR, f"tr[data-batch-id='{batch.id}']")
        assert "completed" in row.text and "300/300" in row.text
        screenshot(browser, tmp_path, "dashboard-batches")

        row.find_element(By.LINK_TEXT, batch.id).click()
        assert browser.find_element(By.ID, "batch-id").text.startswith(batch.id)
        shown = {name: browser.find_element(By.ID, name).text for name in ("total", "succeeded", "failed")}
        assert shown == {"total": "300", "succeeded": "294", "failed": "6"}  # as SQL says
        for name in ("items_per_s", "tokens_per_s", "queue_wait", "engine_time"):
            series = browser.find_element(By.CSS_SELECTOR, f"#chart-{name} svg g#data-{name} path")
            assert series.is_displayed() and len(series.get_attribute("d") or "") > 20, name
        errors = browser.find_element(By.ID, "errors").text
        assert "unsupported" in errors and "r7" in errors
        assert browser.find_element(By.ID, "download").get_attribute("href") == f"{base}/batches/{batch.id}/output.jsonl"
        screenshot(browser, tmp_path, "dashboard-batch")

        browser.find_element(By.LINK_TEXT, "Workers").click()
        worker = browser.find_element(By.CSS_SELECTOR, "#workers tr.worker")
        assert "null" in worker.text and "generate" in worker.text  # PacedEngine is a NullEngine
        screenshot(browser, tmp_path, "dashboard-workers")
        browser.find_element(By.LINK_TEXT, "Schedules").click()
        assert browser.find_element(By.ID, "no-runs").is_displayed()  # the run below is not project a's
        assert console_errors(browser) == []

        run = run_a_schedule(settings, tmp_path)
        sign_in(browser, base, admin)  # an admin sees every project: the schedule's batch and project a's
        assert browser.find_element(By.CSS_SELECTOR, f"tr[data-batch-id='{batch.id}']")
        browser.find_element(By.LINK_TEXT, "Schedules").click()
        latest = browser.find_element(By.ID, "schedules").text
        assert "digest" in latest and "succeeded" in latest and str(run.batch_id) in latest
        assert "12" in browser.find_element(By.ID, "runs").text  # its items
        screenshot(browser, tmp_path, "dashboard-schedules")
        assert console_errors(browser) == []

        sign_in(browser, base, key_b)  # another project sees neither the batch nor its page
        assert batch.id not in browser.page_source and browser.find_element(By.ID, "no-batches")
        browser.get(f"{base}/batches/{batch.id}")
        assert "No batch" in browser.find_element(By.TAG_NAME, "h2").text
        browser.get(f"{base}/batches/{batch.id}/output.jsonl")
        assert "r0" not in browser.page_source
    finally:
        proc.terminate()
        proc.wait(timeout=120)
