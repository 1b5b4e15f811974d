"""Look at the MLflow and Prefect web UIs in a real headless Chromium.

Helpers for the browser tests (marker ``browser``): each opens one page with
Playwright driving Debian's Chromium (``/usr/bin/chromium``; Playwright's own
browser download needs the internet), waits until the page has rendered its
data, saves a screenshot and returns the page's text for the caller to assert
on. Chromium missing means skip, unless ``VISIONPIPE_REQUIRE_CHROMIUM=1`` (set
by ``.ci/run``), which makes it a failure.

    text = mlflow_compare_page(url, [teacher, student, int8], "1", reports / "compare.png")
    assert mlflow_ui_number(0.9312) in text  # "0.931", as the UI rounds it
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_ENV = "VISIONPIPE_REQUIRE_CHROMIUM"
# Without the background-networking flags Chromium keeps dialling Google's
# hosts, which this machine's closed network refuses; --no-sandbox because CI runs as root.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 60_000  # two shared cores: a cold page plus its first API calls can take a while

# MLflow 3.17 opens its assistant side panel on a browser's first visit; these are
# the keys it remembers that in. Unknown keys are harmless if a release renames them.
_MLFLOW_QUIET_STORAGE = """
localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
"""

# Compare page rendered: the run table names every run and the metric grid has values.
_MLFLOW_READY = """
(runIds) => {
  const table = document.querySelector("table.mlflow-compare-run-table");
  if (!table || !runIds.every((id) => table.innerText.includes(id))) return false;
  if (document.body.innerText.includes("No metrics to display")) return true;
  const key = document.querySelector('a[href^="#/metric?"]');
  const grids = [...document.querySelectorAll(".ReactVirtualized__Grid")];
  const values = key && grids[grids.indexOf(key.closest(".ReactVirtualized__Grid")) + 1];
  return Boolean(values && [...values.querySelectorAll("span")].some((s) => s.innerText.trim()));
}
"""

# The metric table is a react-virtualized grid capped at 300 px (about six rows),
# which renders only the rows near its scroll position: a metric far down the
# alphabet (size_bytes among 16 keys) is not in the DOM at all. Scroll through the
# whole grid and read every row. The key column is a second grid that the page
# scrolls along from stale state, one scroll behind, so it is scrolled here too.
_MLFLOW_METRIC_ROWS = """
async () => {
  const key = document.querySelector('a[href^="#/metric?"]');
  if (!key) return [];
  const keyGrid = key.closest(".ReactVirtualized__Grid");
  const grids = [...document.querySelectorAll(".ReactVirtualized__Grid")];
  const valueGrid = grids[grids.indexOf(keyGrid) + 1];
  const cells = (grid) =>
    [...grid.querySelectorAll(".ReactVirtualized__Grid__innerScrollContainer > div")];
  const rowHeight = parseFloat(cells(keyGrid)[0].style.height);
  const rowCount = Math.round(valueGrid.scrollHeight / rowHeight);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const scrollTo = async (y) => {
    valueGrid.scrollTop = y;
    const first = Math.floor(valueGrid.scrollTop / rowHeight);
    const bottom = valueGrid.scrollTop + valueGrid.clientHeight;
    const last = Math.min(rowCount, Math.ceil(bottom / rowHeight));
    const shown = (grid) => {
      const tops = new Set(cells(grid).map((c) => parseFloat(c.style.top)));
      for (let i = first; i < last; i++) if (!tops.has(i * rowHeight)) return false;
      return true;
    };
    for (let i = 0; i < 250; i++) {
      if (keyGrid.scrollTop !== valueGrid.scrollTop) keyGrid.scrollTop = valueGrid.scrollTop;
      else if (shown(keyGrid) && shown(valueGrid)) return;
      await sleep(20);
    }
    throw new Error(`metric rows ${first}-${last} did not render`);
  };
  const rows = new Map();  // pixel top of a row -> {key, values: Map(pixel left -> text)}
  const row = (top) => rows.get(top) ?? rows.set(top, { key: "", values: new Map() }).get(top);
  for (let y = 0; ; y += valueGrid.clientHeight) {
    await scrollTo(y);
    for (const c of cells(keyGrid)) row(parseFloat(c.style.top)).key = c.innerText.trim();
    for (const c of cells(valueGrid)) {
      row(parseFloat(c.style.top)).values.set(parseFloat(c.style.left), c.innerText.trim());
    }
    if (y + valueGrid.clientHeight >= valueGrid.scrollHeight) break;
  }
  await scrollTo(0);  // the screenshot shows the first rows, keys beside their values
  if (rows.size !== rowCount) throw new Error(`read ${rows.size} of ${rowCount} metric rows`);
  return [...rows.entries()]
    .sort(([a], [b]) => a - b)
    .map(([, r]) => [r.key, ...[...r.values].sort(([a], [b]) => a - b).map(([, v]) => v)]);
}
"""

# Runs listed, each with its flow's name (the list shows run names first and fills
# in the flow names from a second request), or the UI's own error banner when it
# cannot reach its API (a server started with the wrong UI API URL).
_PREFECT_CANNOT_CONNECT = "Can't connect to Server API"
_PREFECT_READY = f"""
() => {{
  if (document.body.innerText.includes("{_PREFECT_CANNOT_CONNECT}")) return true;
  const crumbs = [...document.querySelectorAll(".flow-run-bread-crumbs")];
  return crumbs.length > 0 && crumbs.every((c) =>
    c.querySelector('a[href*="/runs/flow-run/"]')?.innerText.trim() &&
    c.querySelector('a[href*="/flows/flow/"]')?.innerText.trim());
}}
"""


def chromium_or_skip() -> str:
    """Path of the system Chromium; skip the test when there is none (fail under CI's flag)."""
    if CHROMIUM.is_file():
        return str(CHROMIUM)
    if found := shutil.which("chromium"):
        return found
    why = f"no Chromium at {CHROMIUM} or on PATH (Debian: apt-get install chromium)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why}, and {REQUIRE_ENV}=1")
    pytest.skip(why)


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A fresh page in headless system Chromium; the browser is closed on exit.

    Playwright's ``launch`` gives every browser a new temporary profile
    (``--user-data-dir``), so no state carries over between calls.
    """
    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=LAUNCH_ARGS
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def mlflow_compare_url(mlflow_url: str, run_ids: list[str], experiment_id: str) -> str:
    """The MLflow UI's run-comparison page, in the format its own links use (compact JSON)."""
    runs = json.dumps(run_ids, separators=(",", ":"))
    experiments = json.dumps([experiment_id], separators=(",", ":"))
    return f"{mlflow_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def mlflow_ui_number(value: float) -> str:
    """A metric value as MLflow 3.17's UI prints it (a port of its ``Utils.formatMetric``).

    0 -> "0"; |x| < 0.001 -> 3-digit exponent ("4.560e-4"); |x| < 10 -> 3 decimals;
    |x| < 100 -> 2 decimals; else 1 decimal; trailing zeros dropped as JavaScript does
    (0.8801 -> "0.88", 2345678.0 -> "2345678"). JavaScript's ``Math.round`` rounds
    halves up, hence ``floor(x + 0.5)`` rather than Python's ``round``.
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    if abs(value) < 0.001:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    rounded = math.floor(value * scale + 0.5) / scale
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def mlflow_compare_page(
    mlflow_url: str, run_ids: list[str], experiment_id: str, screenshot: Path
) -> str:
    """Open MLflow's comparison of ``run_ids``, screenshot it, return its text.

    The text is the page's ``innerText`` followed by every row of the metric
    table, one per line: ``key<TAB>value per run`` in the page's column order,
    values formatted as the UI shows them (see :func:`mlflow_ui_number`). The
    rows are read by scrolling the table, since it only renders the rows near
    its scroll position; the screenshot shows the first six.
    """
    with chromium_page() as page:
        page.add_init_script(_MLFLOW_QUIET_STORAGE)
        page.goto(mlflow_compare_url(mlflow_url, run_ids, experiment_id))
        _wait_or_screenshot(page, _MLFLOW_READY, run_ids, screenshot)
        rows = page.evaluate(_MLFLOW_METRIC_ROWS)
        text = page.inner_text("body")
        _screenshot_everything(page, screenshot)
    table = "\n".join("\t".join(row) for row in rows)
    return f"{text}\n\nMetric table, all rows:\n{table}\n"


def prefect_flow_runs_page(prefect_ui_url: str, screenshot: Path) -> str:
    """Open the Prefect UI's flow-run list (``<ui>/runs``), screenshot it, return its text.

    ``prefect_ui_url`` is the server's root (``http://127.0.0.1:4200``), not its ``/api``.
    The UI asks ``/ui-settings`` where its API is: a server started with
    ``--port N`` but none of ``PREFECT_API_URL``, ``PREFECT_SERVER_UI_API_URL`` or
    ``PREFECT_SERVER_API_PORT`` tells it port 4200, and the page shows only an error banner.
    """
    with chromium_page() as page:
        page.goto(f"{prefect_ui_url.rstrip('/')}/runs")
        _wait_or_screenshot(page, _PREFECT_READY, None, screenshot)
        text = page.inner_text("body")
        if _PREFECT_CANNOT_CONNECT in text:
            raise AssertionError(f"the Prefect UI cannot reach its API:\n{text}")
        _screenshot_everything(page, screenshot)
    return text


def _wait_or_screenshot(page: Page, ready: str, arg: object, screenshot: Path) -> None:
    """Wait for ``ready`` to be true; on a timeout keep a screenshot of what was there instead."""
    try:
        page.wait_for_function(ready, arg=arg)
    except PlaywrightTimeoutError:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        raise


def _screenshot_everything(page: Page, path: Path) -> None:
    """Full-page PNG, with the viewport grown to fit a window-sized inner scrolling pane.

    MLflow scrolls its ``<main>``, not the document, so a plain full-page
    screenshot would stop at the window's bottom edge. Small panes (the metric
    table's 300 px grid) keep their own scrolling.
    """
    overflow = page.evaluate(
        """() => Math.max(0, ...[...document.querySelectorAll("*")]
              .filter((e) => ["auto", "scroll"].includes(getComputedStyle(e).overflowY)
                             && e.clientHeight >= innerHeight / 2)
              .map((e) => e.scrollHeight - e.clientHeight))"""
    )
    if overflow:
        page.set_viewport_size(
            {"width": VIEWPORT["width"], "height": VIEWPORT["height"] + overflow}
        )
        page.evaluate(
            "() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
