"""The console in a real browser (headless Chromium driven by Selenium with Debian's chromedriver):
the coordinator view follows a real training run, the site view's Approve button lets a waiting run
proceed, the essentials work with JavaScript off, and no page asks any host but the console.

Screenshots are written under pytest's tmp folder (their paths are printed: ``pytest -s``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from arkfed.console.serve import ConsoleSettings, start_console
from arkfed.site.config import load_site_config
from arkfed.site.policy import approved_runs
from console_fixtures import WaitingRun, federated_run, site_yaml
from system_packages import find_program, require_programs

pytestmark = pytest.mark.slow
CHROMIUM = find_program("chromium", "/usr/bin/chromium")
CHROMEDRIVER = find_program("chromedriver", "/usr/bin/chromedriver")
TRAIN = ["--model", "test_resnet", "--img-size", "32", "--projector-dim", "16", "--batch-size", "8",
         "--max-steps-per-visit", "1", "--rounds", "4", "-q"]


@pytest.fixture
def browser():
    """``browser(javascript=True)``: a headless Chromium that logs every request it makes."""
    require_programs({"chromium": CHROMIUM, "chromedriver": CHROMEDRIVER}, "chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make(javascript: bool = True):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update"):
            options.add_argument(arg)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
        if not javascript:
            options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_only_own_host(driver, console_url: str) -> None:
    urls = requested_urls(driver)
    bad = [u for u in urls if not (u.startswith(console_url) or u.startswith("data:"))]
    assert urls and not bad, bad


def screenshot(driver, path) -> None:
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(height + 40, 2400))
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_coordinator_view_follows_a_real_training_run(browser, tmp_path):
    from arkfed.demo.generate import generate_demo_federation

    demo = tmp_path / "demo-data"
    generate_demo_federation(demo, seed=0, size=32, counts={"demo-nih": 40, "demo-chexpert": 40, "demo-shenzhen": 30})
    run_dir = tmp_path / "run"
    console = start_console("run", run_dir, ConsoleSettings(address="127.0.0.1:0", poll_seconds=0.5))
    driver = browser()
    try:
        driver.get(console.url)  # before the run starts: the page waits for it
        train = subprocess.Popen([sys.executable, "-m", "arkfed", "train", "--demo-dir", str(demo), "--out", str(run_dir), *TRAIN],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            visits = driver.execute_script("return document.body.getAttribute('data-visits')")
            points = driver.execute_script("return document.getElementById('chart-student').getAttribute('data-points')")
            if visits is not None:
                seen.append((int(visits), int(points)))
            if train.poll() is not None and driver.find_element("id", "phase").text == "finished" and seen and seen[-1][0] == 12:
                break
            time.sleep(0.25)
        output = train.communicate()[0]
        assert train.returncode == 0, output
        counters = sorted({v for v, _ in seen})
        point_counts = sorted({p for _, p in seen})
        assert [v for v, _ in seen] == sorted(v for v, _ in seen)  # the counter only grows
        assert len([v for v in counters if 0 < v < 12]) >= 1 and counters[-1] == 12, seen  # seen mid-run, then at the end
        assert len([p for p in point_counts if p > 0]) >= 2, seen  # the chart gained points while the run trained
        final = json.loads(driver.execute_script("return fetch('/api/run').then(r => r.text())"))
        assert point_counts[-1] == sum(v is not None for values in final["auc"]["student"].values() for v in values)
        assert driver.find_element("id", "visits-done").text == "12"
        assert driver.find_elements("css selector", "#chart-student canvas")  # uPlot drew it
        screenshot(driver, tmp_path / "coordinator-view.png")
        assert_only_own_host(driver, console.url)
    finally:
        console.stop()


def test_site_view_approve_button_lets_the_waiting_run_proceed(browser, tmp_path):
    path = site_yaml(tmp_path)
    state = load_site_config(path).local_state_dir
    console = start_console("site", path, ConsoleSettings(address="127.0.0.1:0", poll_seconds=0.5))
    try:
        waiting = WaitingRun(state).start_waiting()
        driver = browser()
        driver.get(console.url)
        article = driver.find_element("css selector", f'article[data-fingerprint="{waiting.fingerprint}"]')
        screenshot(driver, tmp_path / "site-view.png")
        article.find_element("css selector", "button.approve").click()
        waiting.join(10)
        assert waiting.result is None and waiting.fingerprint in approved_runs(state)  # the run proceeds
        assert driver.find_element("id", "done").text == f"Run approved {waiting.fingerprint}."
        assert driver.find_element("id", "pending-count").text == "0"
        assert_only_own_host(driver, console.url)
    finally:
        console.stop()


def test_essentials_work_with_javascript_disabled(browser, tmp_path):
    run_dir = federated_run(tmp_path / "run")
    path = site_yaml(tmp_path)
    state = load_site_config(path).local_state_dir
    coordinator = start_console("run", run_dir, ConsoleSettings(address="127.0.0.1:0"))
    site = start_console("site", path, ConsoleSettings(address="127.0.0.1:0"))
    try:
        driver = browser(javascript=False)
        driver.get(coordinator.url)
        assert driver.find_element("id", "visits-done").text == "6"
        states = {row.get_attribute("data-site"): row.find_element("css selector", ".state").text
                  for row in driver.find_elements("css selector", "#sites tbody tr")}
        assert states == {"north": "training", "south": "done", "east": "refused"}
        assert "0.610" in driver.find_element("id", "auc-table").text  # the numbers, without the chart
        assert driver.find_element("id", "chart-student").get_attribute("data-points") == "0"  # no script ran
        assert_only_own_host(driver, coordinator.url)

        waiting = WaitingRun(state, lr=0.002).start_waiting()
        driver.get(site.url)
        driver.find_element("css selector", f'article[data-fingerprint="{waiting.fingerprint}"] button.approve').click()
        waiting.join(10)
        assert waiting.result is None and driver.find_element("id", "done").text == f"Run approved {waiting.fingerprint}."
        screenshot(driver, tmp_path / "site-view-no-javascript.png")
        assert_only_own_host(driver, site.url)
    finally:
        coordinator.stop()
        site.stop()
