"""A real browser for the UI tests: Debian's Chromium driven by Selenium through Debian's chromedriver.

`make test` installs both when run as root (its `browser` target). Without them the browser tests
skip, with a message saying so, except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def screenshot_folder(tmp_path: Path, name: str) -> Path:
    """Where a test's screenshots go: its own output folder, or KEEL_SCREENSHOTS/<name> when set
    (`tests/screenshots/` holds the README's, made that way)."""
    chosen = os.environ.get("KEEL_SCREENSHOTS")
    return Path(chosen) / name if chosen else tmp_path / "screenshots"


def browser_binaries() -> tuple[str, str]:
    """Chromium and its WebDriver, or skip (fail under CI=true) saying what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(n for n, found in (("chromium", chromium), ("chromedriver", driver)) if not found)
    message = f"{missing} not installed (make test installs Debian's chromium and chromium-driver as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium session with its own profile, closed (and its processes gone) afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_binaries()
    profile = tempfile.mkdtemp(prefix="keel-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def basic_auth(driver, user: str, password: str) -> None:
    """Send HTTP basic credentials with every request of this browser (as a browser's login prompt would)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def wait_for(driver, condition: Callable[[], object], what: str, timeout: float = 60) -> object:
    """Poll `condition` until it returns something true; fail with the page's text if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except Exception:  # the page is still rendering
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            body = driver.execute_script("return document.body ? document.body.innerText : ''")
            if len(body) > 6000:  # a toast or an error is often at the end of the page
                body = f"{body[:3000]}\n[... {len(body) - 6000} characters ...]\n{body[-3000:]}"
            pytest.fail(
                f"{what} did not appear within {timeout:g}s at {driver.current_url}; the page says:\n{body}"
            )
        time.sleep(0.5)


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def screenshot(driver, folder: Path, name: str) -> Path:
    """Save what the browser shows now as `folder/name.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
