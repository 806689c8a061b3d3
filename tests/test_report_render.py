"""The report renders in a real browser: headless Chromium loads report.html from disk (file://) and
the page logs no console error, throws no exception, requests nothing over the network, decodes every
plot, and has no horizontal overflow on a phone-sized screen. Screenshots are saved under the test's tmp dir
(and the desktop one copied to /tmp/report-screenshot.png for a person to look at).

Driven through the Chrome DevTools Protocol (a websocket to ``--remote-debugging-port``), so the checks see
every request and console message rather than scraping logs. Chromium is Debian's ``chromium`` package
(scripts/setup.sh installs it); the test skips, saying so, where it is absent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_report import make_all

from adaptive_ft.report import ReportInputs, build_report

websocket = pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium (pip install "
                                                    "-e '.[test]')")

CHROMIUM = os.environ.get("ADAPTIVE_FT_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                                         "(apt-get install chromium, or run scripts/setup.sh)")
LOCAL_SCHEMES = ("file:", "data:", "about:", "chrome:", "devtools:")
SCREENSHOT_COPY = Path("/tmp/report-screenshot.png")


class Browser:
    """A headless Chromium with one page, driven over CDP; records every event it sees."""

    def __init__(self, profile: Path):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--hide-scrollbars", "--remote-debugging-port=0",
                 f"--user-data-dir={profile}", "about:blank"]
        # Chromium leaves a folder with its singleton socket in TMPDIR; give it a short one (a socket path must
        # stay under 108 bytes, which pytest's tmp paths can exceed) and remove it on close
        self.scratch = Path(tempfile.mkdtemp(prefix="aft-chromium-"))
        self.proc = subprocess.Popen([CHROMIUM, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TMPDIR": str(self.scratch)})
        port = self._port(profile)
        page = self._page_target(port)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0

    def _port(self, profile: Path, timeout: float = 30.0) -> int:
        """Chromium writes the port it chose into DevToolsActivePort once it listens."""
        marker, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before listening")
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port within 30 s")

    @staticmethod
    def _page_target(port: int) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]
            time.sleep(0.1)
        raise TimeoutError("no page target in chromium")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and wait for its reply, keeping the events that arrive meanwhile."""
        self._id += 1
        self.ws.settimeout(60)  # a full-page screenshot of a long report takes a few seconds
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))

    def settle(self, seconds: float) -> None:
        """Collect events for a while (late requests, errors after load)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            shutil.rmtree(self.scratch, ignore_errors=True)


def _load(browser: Browser, url: str, width: int, height: int = 900) -> None:
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable")
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                 mobile=width < 600)
    browser.events.clear()
    browser.call("Page.navigate", url=url)
    browser.wait_for("Page.loadEventFired")
    browser.settle(0.7)


def _screenshot(browser: Browser, path: Path) -> Path:
    size = browser.call("Page.getLayoutMetrics")["cssContentSize"]
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _problems(events: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(console errors and exceptions, URLs requested outside the file itself and its data: URIs)."""
    errors, requests = [], []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + p["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = (p.get("request") or {}).get("url") or p.get("url", "")
            if not url.startswith(LOCAL_SCHEMES):
                requests.append(url)
    return errors, requests


def _evaluate(browser: Browser, expression: str) -> Any:
    return browser.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    inputs = make_all(folder)
    return build_report(ReportInputs(plan=inputs.plan, run=inputs.run, eval=inputs.eval, export=inputs.export),
                        folder / "report.html").html


def test_report_renders_in_chromium_without_errors_or_network(report_file: Path, tmp_path: Path) -> None:
    browser = Browser(tmp_path / "profile")
    try:
        _load(browser, report_file.as_uri(), width=1280)
        errors, requests = _problems(browser.events)
        images = _evaluate(browser, "[...document.images].map(i => [i.complete, i.naturalWidth])")
        sections = _evaluate(browser, "[...document.querySelectorAll('main section.card')].map(s => s.id)")
        shot = _screenshot(browser, tmp_path / "report-desktop.png")
        # the same page on a phone: no sideways scrolling (wide tables scroll inside their own box)
        _load(browser, report_file.as_uri(), width=390, height=844)
        overflow = _evaluate(browser, "document.documentElement.scrollWidth - window.innerWidth")
        phone_errors, phone_requests = _problems(browser.events)
        _screenshot(browser, tmp_path / "report-phone.png")
    finally:
        browser.close()
    assert overflow <= 0, f"page is {overflow}px wider than a 390px screen"
    assert phone_errors == [] and phone_requests == []
    assert errors == [], errors
    assert requests == [], f"the report requested {requests}"
    assert len(images) == 9 and all(done and width > 300 for done, width in images), images  # every plot decoded
    assert sections[0] == "summary" and "eval-segment" in sections and "export" in sections
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    try:
        shutil.copy(shot, SCREENSHOT_COPY)  # for a person to look at; not part of the assertion
    except OSError:
        pass


def test_network_check_catches_an_external_reference(tmp_path: Path) -> None:
    """The harness itself works: a page that references a remote image and logs an error is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><img src="http://192.0.2.1/x.png"><script>console.error("boom")</script>')
    browser = Browser(tmp_path / "profile")
    try:
        _load(browser, page.as_uri(), width=800)
        errors, requests = _problems(browser.events)
    finally:
        browser.close()
    assert requests == ["http://192.0.2.1/x.png"]
    assert any("boom" in e for e in errors)
