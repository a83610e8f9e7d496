"""Stage 8's comparison as a user sees it: TensorBoard, served from the folder that
:func:`asr_parallel.bin.compare.write_tensorboard` writes, opened in headless Chromium (Debian's
``chromium`` and ``chromium-driver``, driven by selenium; all installed by tools/setup.sh).

No training: the runs are fabricated rows shaped like :func:`asr_parallel.bin.compare.collect`'s.
The HParams table view must list every run by name with its dev WER; the Time Series page must show
the ``compare/*`` overlays first, with every run and its last greedy dev WER, and the Custom Scalars
page both overlay charts, each matching every run.
TensorBoard's Polymer dashboards keep their text in shadow roots, so the page is read by scripts
that walk them. Screenshots of each page are left in the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]
WAIT = 25.0  # seconds for TensorBoard to load the runs and for each page to render

# label, strategy section, ranks, dev worn WER (WFST), greedy dev WER per epoch
RUNS = [("single", {"name": "single"}, 1, 23.31, [41.5, 30.25, 26.0]),
        ("sync_sgd_w2", {"name": "sync_sgd"}, 2, 27.64, [44.0, 33.5, 29.75]),
        ("bmuf_block_momentum0.5_w2", {"name": "bmuf", "block_momentum": 0.5}, 2, 31.07, [47.0, 36.0, 32.5])]

# Every text node of the page, shadow roots included (style and script text left out).
PAGE_TEXT_JS = """
const out = [];
const walk = (n) => {
  if (n.nodeType === Node.TEXT_NODE) { const s = n.textContent.trim(); if (s) out.push(s); return; }
  if (n.nodeType === Node.ELEMENT_NODE && ['STYLE', 'SCRIPT', 'TEMPLATE'].includes(n.tagName)) return;
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.childNodes) walk(c);
};
walk(document);
return out.join('\\n');
"""
# The HParams table view's rows (the header first), cell by cell: its vaadin-grid, inside
# tf-hparams-table-view's shadow root, renders each row as a <tr> whose cells slot in their content.
HPARAMS_TABLE_JS = """
const grids = [];
const walk = (n) => {
  if (n.nodeType !== Node.ELEMENT_NODE && n.nodeType !== Node.DOCUMENT_FRAGMENT_NODE
      && n.nodeType !== Node.DOCUMENT_NODE) return;
  if (n.tagName === 'VAADIN-GRID') {
    const root = n.getRootNode();
    if (root.host && root.host.tagName === 'TF-HPARAMS-TABLE-VIEW') grids.push(n);
  }
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.children || []) walk(c);
};
walk(document);
return grids.map(g => [...g.shadowRoot.querySelectorAll('tr')].map(tr => [...tr.querySelectorAll('th, td')].map(td => {
  const slot = td.querySelector('slot');
  return slot ? slot.assignedNodes({flatten: true}).map(x => x.textContent.trim()).join(' ').trim() : '';
})));
"""
# The HParams dashboard's column list: the label of every hparam checkbox in tf-hparams-query-pane
# (each one a column of the table; TensorBoard shows the first five and lets the user tick the rest).
HPARAMS_COLUMN_LIST_JS = """
const out = [];
const walk = (n) => {
  if (n.nodeType !== Node.ELEMENT_NODE && n.nodeType !== Node.DOCUMENT_FRAGMENT_NODE
      && n.nodeType !== Node.DOCUMENT_NODE) return;
  if (n.tagName === 'PAPER-CHECKBOX') {
    const root = n.getRootNode();
    if (root.host && root.host.tagName === 'TF-HPARAMS-QUERY-PANE') out.push(n.textContent.trim());
  }
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.children || []) walk(c);
};
walk(document);
return out;
"""
# The Time Series page's scalar cards (Angular, no shadow DOM): tag and text of each.
SCALAR_CARDS_JS = """
return [...document.querySelectorAll('scalar-card')].map(c => {
  const tag = c.querySelector('tb-truncated-path');
  return [tag ? tag.textContent.trim() : '', c.innerText];
});
"""


def rows() -> list[dict]:
    """The runs as compare.collect gives them (only what write_tensorboard reads)."""
    out = []
    for label, strategy, ranks, dev, greedy in RUNS:
        out.append({"label": label, "run": label, "seed": 42, "strategy": strategy, "world_size": ranks,
                    "model": "mlp", "dev_worn_wer": dev, "eval_worn_wer": round(dev + 1.5, 2),
                    "dev_array_wer": round(dev + 9.0, 2), "wall_seconds": 95.0 + 10 * ranks,
                    "bytes_sent_per_rank": 0 if ranks == 1 else 2_000_000, "frames_per_second": 4000.0,
                    "history": [{"epoch": i + 1, "dev_wer_greedy": w, "elapsed_seconds": 30.0 * (i + 1),
                                 "bytes_sent": 0 if ranks == 1 else 700_000 * (i + 1)}
                                for i, w in enumerate(greedy)]})
    return out


def tensorboard_format(v: float) -> str:
    """How the HParams table prints a metric: JavaScript's ``toPrecision(5)`` (23.31 -> "23.310")."""
    return f"{v:#.5g}"


def browser_or_skip():
    """selenium and Debian's chromium with its driver; skipped where they are missing and we may
    not install them, an error as root (tools/setup.sh installs them)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the project's [test] extra)")
    if missing:
        why = f"missing {', '.join(missing)}"
        if os.geteuid() != 0:
            pytest.skip(f"headless browser check: {why}; install them with tools/setup.sh as root "
                        "(Debian packages chromium chromium-driver, and pip install -e '.[test]')")
        pytest.fail(f"headless browser check: {why}; run tools/setup.sh (it installs chromium, chromium-driver "
                    "and selenium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe, timeout: float = WAIT, retry_on: tuple = (OSError,)):
    """Call ``probe`` until it returns something true; that value, or a failure naming ``what``.
    A ``retry_on`` error (a server or page still starting) counts as not yet."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except retry_on as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {str(last)[-2000:]}")


@pytest.fixture
def tensorboard(tmp_path):
    """TensorBoard on a free loopback port, serving the comparison of RUNS; its URL."""
    from asr_parallel.bin.compare import write_tensorboard

    out = tmp_path / "compare"
    write_tensorboard(out, rows())
    port = free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    with open(tmp_path / "tensorboard.log", "w") as log:
        proc = subprocess.Popen(cmd + ["--logdir", str(out / "tensorboard"), "--host", "127.0.0.1",
                                       "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def loaded():
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {(tmp_path / 'tensorboard.log').read_text()}")
            with urllib.request.urlopen(f"{url}/data/runs", timeout=2) as r:
                runs = r.read().decode()
            return all(f'"{label}"' in runs for label, *_ in RUNS)
        wait_for("tensorboard to serve every run", loaded)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def browser(tmp_path):
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        yield driver
    finally:
        try:
            driver.quit()  # ends chromium and chromedriver
        finally:
            service.stop()
            shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_comparison_in_a_browser(browser, tensorboard, tmp_path):
    from selenium.common.exceptions import WebDriverException

    from asr_parallel.bin.compare import OVERLAYS

    by_label = {label: (dev, greedy) for label, _, _, dev, greedy in RUNS}

    # HParams, table view (the default): one row per run, named by it, with its dev WER.
    browser.get(f"{tensorboard}/#hparams")

    def table():
        grids = browser.execute_script(HPARAMS_TABLE_JS)
        if not grids:
            return None
        header, *body = grids[0]
        body = [r for r in body if r and r[0]]
        return (header, body) if len(body) >= len(RUNS) and "hparam/dev_worn_wer" in header else None

    header, body = wait_for("the HParams table view to list every run", table, retry_on=(WebDriverException,))
    browser.save_screenshot(str(tmp_path / "tb_hparams.png"))
    column = header.index("hparam/dev_worn_wer")
    shown = {r[0]: r[column] for r in body}
    assert set(shown) == set(by_label), f"HParams table rows: {body}"
    for label, (dev, _) in by_label.items():
        assert shown[label] == tensorboard_format(dev), f"{label}: dev WER {shown[label]!r} in {body}"
    assert header[0] == "Trial ID" and {"strategy", "model", "seed"} <= set(header)
    text = browser.execute_script(PAGE_TEXT_JS)
    assert "Number of matching session groups: 3" in text
    # The strategies' own parameters are columns of the table: shown, or in its column list.
    column_list = browser.execute_script(HPARAMS_COLUMN_LIST_JS)
    for param in ("strategy.sync_period", "strategy.block_momentum", "strategy.warmup_steps"):
        assert param in header or param in column_list, f"{param} is not an HParams column: {header}, {column_list}"
    assert "strategy.block_momentum" in column_list  # the list is read (a shown column is in it too)

    # Time Series: the compare/* overlays come first, each with every run and its last greedy dev WER.
    browser.get(f"{tensorboard}/#timeseries")

    def cards():
        found = dict(browser.execute_script(SCALAR_CARDS_JS))
        want = ["compare/dev_wer_vs_seconds", "compare/dev_wer_vs_bytes"]
        ready = all(t in found and all(label in found[t] for label in by_label) for t in want)
        return found if ready else None

    found = wait_for("the Time Series page's compare/* cards with every run", cards, retry_on=(WebDriverException,))
    browser.save_screenshot(str(tmp_path / "tb_timeseries.png"))
    tags = list(found)
    assert tags[:2] == sorted(tags[:2]) and {*tags[:2]} == {"compare/dev_wer_vs_seconds", "compare/dev_wer_vs_bytes"}, tags
    # The card's data table, at the last step: run, smoothed, value, step, relative.
    lines = [ln.strip() for ln in found["compare/dev_wer_vs_seconds"].splitlines() if ln.strip()]
    for label, (_, greedy) in by_label.items():
        value = lines[lines.index(label) + 2]
        assert float(value) == greedy[-1], f"{label}: last dev WER {value!r} in {lines}"

    # Custom Scalars: both overlays, one chart each.
    browser.get(f"{tensorboard}/#custom_scalars")

    def overlays():
        page = browser.execute_script(PAGE_TEXT_JS)
        done = all(title in page for title in OVERLAYS.values()) and page.count(f"Matches ({len(RUNS)})") >= 2
        return page if done else None

    text = wait_for("the Custom Scalars page's overlay charts, each matching every run", overlays, retry_on=(WebDriverException,))
    assert "compare" in text.splitlines()
    time.sleep(1)  # the charts draw just after
    browser.save_screenshot(str(tmp_path / "tb_custom_scalars.png"))
