"""
Every page of the dashboard in headless Chromium, over two live scheduler processes:
the charts, the schedulers, run-now, a failed job's traceback and its retry, the
audit trail. With ``DASHBOARD_SCREENSHOTS`` set to a directory, it saves a
screenshot of each page there (the docs' images).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from .support.dashboard_schedulers import ON_DEMAND
from .support.tiers import WIRE_ONLY
from .test_dashboard import CHROMEDRIVER, CHROMIUM, dashboard_process

pytestmark = [
    *WIRE_ONLY,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Chromium and its driver (Debian packages chromium, "
        "chromium-driver) for the test in a real browser",
    ),
]
ROOT = Path(__file__).parent.parent


@contextmanager
def scheduler_process(uri: str, database: str) -> Iterator[subprocess.Popen[str]]:
    """Run one of the test's scheduler processes until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.dashboard_schedulers", uri, database],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == "READY\n", process.communicate(timeout=10)[1]
        yield process
    finally:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover (a hung scheduler)
            process.kill()
            process.communicate()


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)

    return result


def _history_of_two(uri: str, database: str) -> bool:
    """Tell whether two processes have recorded successes and failures."""
    mongo: MongoClient[dict[str, Any]]
    with MongoClient(uri, serverSelectionTimeoutMS=5000) as mongo:
        documents: list[dict[str, Any]] = list(mongo[database]["history"].find({}))

    processes = {document.get("process") for document in documents}
    outcomes: set[str] = set()
    for document in documents:
        outcomes.update(document.get("outcomes", {}))

    return len(processes) >= 2 and {"success", "error"} <= outcomes


class TestEveryPage:
    def test_pages_over_two_live_schedulers(
        self, wire_uri: str, database_name: str, figures: Any
    ) -> None:
        from selenium import webdriver
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.wait import WebDriverWait

        shots = os.environ.get("DASHBOARD_SCREENSHOTS")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu"):
            options.add_argument(argument)

        options.add_argument("--window-size=1280,1000")
        loads: dict[str, float] = {}
        with ExitStack() as stack:
            for _ in range(2):
                stack.enter_context(scheduler_process(wire_uri, database_name))

            _until(
                lambda: _history_of_two(wire_uri, database_name),
                60,
                "two schedulers' history",
            )
            url = stack.enter_context(
                dashboard_process(wire_uri, database_name, "--actions")
            )
            driver = webdriver.Chrome(
                service=Service(str(CHROMEDRIVER)), options=options
            )
            stack.callback(driver.quit)
            wait = WebDriverWait(
                driver, 20, ignored_exceptions=(StaleElementReferenceException,)
            )

            def load(path: str, name: str) -> None:
                started = time.perf_counter()
                driver.get(f"{url}{path}")
                driver.find_element(By.ID, "panels")
                loads[name] = time.perf_counter() - started

            def shoot(name: str) -> None:
                if shots:
                    Path(shots).mkdir(parents=True, exist_ok=True)
                    driver.save_screenshot(str(Path(shots) / f"dashboard-{name}.png"))

            # Overview: charts drawn by the page's script from both processes' history
            load("", "overview")
            wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
            bars = wait.until(
                lambda d: (
                    d.find_elements(
                        By.CSS_SELECTOR, ".charts[data-span='hour'] rect.bar.succeeded"
                    )
                    and d.find_elements(
                        By.CSS_SELECTOR, ".charts[data-span='hour'] rect.bar.failed"
                    )
                )
            )
            assert bars
            assert driver.find_elements(
                By.CSS_SELECTOR, ".charts[data-span='hour'] path.line.p50"
            )
            shoot("overview")

            # Schedulers: both processes, live
            load("schedulers", "schedulers")
            rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-scheduler].alive")
            assert len(rows) == 2
            shoot("schedulers")

            # A schedule's page: run now; the run appears without a reload
            load(f"schedule?id={ON_DEMAND}", "schedule")
            driver.execute_script("window.sameDocument = 'yes'")
            assert "every day" in driver.find_element(By.CSS_SELECTOR, "dd.words").text
            assert len(driver.find_elements(By.CSS_SELECTOR, "ol.times li")) == 10
            clicked = time.perf_counter()
            driver.find_element(By.CSS_SELECTOR, "button.run-now").click()
            wait.until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-run].success")
            )
            ran = time.perf_counter() - clicked
            assert driver.execute_script("return window.sameDocument") == "yes"
            assert "added job" in driver.find_element(By.ID, "said").text
            shoot("schedule")

            # Jobs: the failed ones; one's traceback; retry it
            load("jobs?state=finished&outcome=error", "jobs")
            shoot("jobs")
            link = driver.find_element(By.CSS_SELECTOR, "tr[data-job] td a")
            failed_id = link.text
            link.click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "pre.traceback"))
            traceback = driver.find_element(By.CSS_SELECTOR, "pre.traceback").text
            assert "ValueError: mirror <b>unreachable</b>" in traceback
            assert "Traceback (most recent call last)" in traceback
            shoot("job")
            driver.find_element(By.CSS_SELECTOR, "button.retry").click()
            said = wait.until(
                lambda d: (
                    d.find_element(By.ID, "said").text.startswith("retried")
                    and d.find_element(By.ID, "said").text
                )
            )
            retried_id = said.split()[-1]
            assert failed_id in said

            # The retry runs (and fails again, as its task always does)
            load(f"job?id={retried_id}", "retried job")
            wait.until(
                lambda d: (
                    d.find_element(By.ID, "job").get_attribute("data-outcome")
                    == "error"
                )
            )

            # The audit trail has both actions
            load("audit", "audit")
            actions = [
                row.get_attribute("data-audit")
                for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-audit]")
            ]
            assert actions == ["retry", "run-now"]
            shoot("audit")

        figures(
            "in Chromium, page load (navigation to the page's panels shown): "
            + ", ".join(
                f"{name} {seconds * 1000:.0f} ms" for name, seconds in loads.items()
            )
            + f"; a run-now job ran and showed on its schedule's page {ran:.2f} s "
            "after the click, without a reload"
        )
