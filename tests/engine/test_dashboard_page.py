"""GET /dashboard in headless Chromium against a live server with traffic: the page fetches
/metrics on its own, every chart draws points, and a screenshot is taken: into the test's tmp
dir, or, with ZEROSERVE_SAVE_SCREENSHOTS=1, over docs/images/dashboard.png for the docs (so a
plain test run leaves the tree clean).

Chromium is driven over its DevTools protocol (aiohttp's websocket client, no other package)
rather than with --dump-dom and --virtual-time-budget: virtual time runs the page's clock far
ahead of the server's, so rates and the time axis would not be what an operator sees.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import aiohttp
import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
SCREENSHOT = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "images", "dashboard.png")
CHARTS = ["throughput", "ttft", "itl", "queue", "kv", "e2e"]
STATE = (
    "JSON.stringify({status: document.getElementById('status').dataset, model: "
    "document.getElementById('model').textContent, charts: Object.fromEntries(" + json.dumps(CHARTS) + ".map("
    "c => [c, Number(document.getElementById('chart-' + c).dataset.points || 0)]))})"
)


class Traffic:
    """Completions from two threads until stopped, with an invalid one now and then."""

    def __init__(self, server):
        self.server = server
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(2)]

    def run(self, worker: int) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            body = {
                "prompt": f"Story {worker}-{i}: once upon a time",
                "max_tokens": 12 + (i % 3) * 8,
                "seed": i,
            }
            if i % 7 == 6:
                body["max_tokens"] = 0  # a 400: the errors tile counts it
            status, _ = self.server.post("/v1/completions", body, timeout=120)
            self.statuses.append(status)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


class DevTools:
    """One page of a headless Chromium, over the DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == call_id:
                assert "error" not in msg, msg
                return msg["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def start_chromium(profile: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(port_file):
            with open(port_file) as f:
                first = f.readline().strip()
            if first:
                return proc, int(first)
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("chromium did not open its DevTools port")


async def watch_dashboard(url: str, port: int, enough, timeout_s: float) -> tuple[dict, bytes]:
    """Open url, poll the page's state until enough(state) (or timeout), then screenshot it."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t["type"] == "page"]
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                            mobile=False)  # fmt: skip
            await page.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            state: dict = {}
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                value = await page.evaluate(STATE)
                state = json.loads(value) if value else {}
                if state and enough(state):
                    break
            shot = await page.call("Page.captureScreenshot", format="png")
            return state, base64.b64decode(shot["data"])


@pytest.mark.skipif(CHROMIUM is None, reason="install Debian's chromium (apt-get install chromium)")
def test_the_dashboard_charts_live_traffic_in_chromium(zeroserve_server, tmp_path):
    url = f"{zeroserve_server.base_url}/dashboard?interval_ms=1000"

    def enough(state: dict) -> bool:
        return int(state["status"].get("samples", 0)) >= 20 and all(n >= 8 for n in state["charts"].values())

    profile = tempfile.mkdtemp(prefix="zs-chromium-")
    chromium, port = start_chromium(profile)
    try:
        with Traffic(zeroserve_server) as traffic:
            state, png = asyncio.run(watch_dashboard(url, port, enough, timeout_s=150))
    finally:
        chromium.kill()
        chromium.wait()
        shutil.rmtree(profile, ignore_errors=True)
    # the page got /metrics without a key (exempt, as /metrics is) and drew every chart
    assert state["status"]["state"] == "ok", state
    assert int(state["status"]["samples"]) >= 20, state
    assert state["model"], state
    for chart, points in state["charts"].items():
        assert points >= 8, (chart, state)
    assert 200 in traffic.statuses and 400 in traffic.statuses
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    path = SCREENSHOT if os.environ.get("ZEROSERVE_SAVE_SCREENSHOTS") == "1" else tmp_path / "dashboard.png"
    with open(path, "wb") as f:
        f.write(png)
