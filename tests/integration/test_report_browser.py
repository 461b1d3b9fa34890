"""The drift report opened in a real browser (headless Chromium): data that tries to run script, in a
column name and in values, runs nothing; Evidently's own page still renders. The same page without
`inert_data` runs the data's script in the same browser, so the test can fail. And the report fits
the narrow frame MLflow shows artifacts in, where Evidently's own page is cut off."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest

from tasks.monitoring.drift_report import build_report
from tests.browser import browser_binaries, chromium, screenshot, screenshot_folder, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# If any of these runs, it marks the page's <body>; the marker is what the test looks for.
RUNS = "document.body.setAttribute('data-ran','yes')"
VALUE = f"</script><script>{RUNS}</script>"
COLUMN = f'<img src=x onerror="{RUNS}">|x'


def rendered(browser: str, page, profile) -> str:
    """The DOM after the page's scripts ran (Evidently's bundle renders the report client-side)."""
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_hostile_names_and_values_run_nothing_in_a_real_browser(tmp_path):
    browser, _ = browser_binaries()
    rng = np.random.default_rng(0)

    def frame(n: int) -> pd.DataFrame:
        return pd.DataFrame({"x": rng.normal(size=n), COLUMN: rng.choice([VALUE, "b", "c"], size=n)})

    report = build_report(frame(300), frame(100), ["x"], [COLUMN])
    assert report.save(tmp_path / "report.html", tmp_path / "report.json", 50 * 2**20)
    page = rendered(browser, tmp_path / "report.html", tmp_path / "profile-a")
    assert 'data-ran="yes"' not in page
    assert "Data Drift" in page or "Drift" in page  # Evidently's own scripts did render the report

    raw = tmp_path / "raw.html"  # the control: Evidently's page as it writes it
    raw.write_text(report.snapshot.get_html_str(as_iframe=False), encoding="utf-8")
    assert 'data-ran="yes"' in rendered(browser, raw, tmp_path / "profile-b")


WIDEST = (
    "return Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))"
)


def test_the_report_fits_the_frame_mlflow_shows_it_in(tmp_path):
    """At the width of MLflow's artifact frame (~560 px), nothing of the report is beyond the right edge."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"x": rng.normal(size=300), "y": rng.choice(["a", "b"], size=300)})
    report = build_report(frame, frame.sample(100, random_state=1), ["x"], ["y"])
    report.save(tmp_path / "report.html", tmp_path / "report.json", 50 * 2**20)
    raw = tmp_path / "raw.html"
    raw.write_text(report.snapshot.get_html_str(as_iframe=False), encoding="utf-8")
    widths = {}
    with chromium(width=560, height=900) as driver:
        for name, page in (("ours", tmp_path / "report.html"), ("evidently", raw)):
            driver.get(page.as_uri())
            wait_for(
                driver,
                lambda: "Drift" in driver.execute_script("return document.body.innerText"),
                "the report",
            )
            widths[name] = driver.execute_script(WIDEST), driver.execute_script("return window.innerWidth")
            screenshot(driver, screenshot_folder(tmp_path, "report"), f"report-{name}-560px")
    ours, frame_width = widths["ours"]
    assert ours <= frame_width, widths
    assert widths["evidently"][0] > widths["evidently"][1], widths  # the control: cut off without the style
