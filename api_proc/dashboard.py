"""GET /dashboard: a live page of this server's throughput, latency percentiles, queue and KV
usage over the last minutes, drawn by a small script from periodic fetches of /metrics.

One self-contained response: ``static/dashboard.html`` with ``dashboard.css`` and
``dashboard.js`` put inline, so the page is one path (one entry in ``auth_exempt_paths``, like
/metrics, whose numbers are all it shows) and needs no build step, CDN or other origin. The
Content-Security-Policy allows exactly those two inline blocks (by hash) and fetches to this
server. The metric prefix (``--metrics-prefix``) is written into the page for the script.
"""

from __future__ import annotations

import base64
import hashlib
import html
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
PAGE_KEY = web.AppKey("zeroserve_dashboard_page", tuple)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def build_page(prefix: str) -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy."""
    css = (STATIC / "dashboard.css").read_text()
    js = (STATIC / "dashboard.js").read_text()
    page = (
        (STATIC / "dashboard.html")
        .read_text()
        .replace("{{prefix}}", html.escape(prefix, quote=True))
        .replace("{{style}}", f"<style>{css}</style>")
        .replace("{{script}}", f"<script>{js}</script>")
    )
    csp = (
        f"default-src 'none'; script-src {_sha256(js)}; style-src {_sha256(css)}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page.encode(), csp


async def dashboard(request: web.Request) -> web.Response:
    body, csp = request.app[PAGE_KEY]
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"},
    )


def add_dashboard_routes(app: web.Application, prefix: str) -> None:
    app[PAGE_KEY] = build_page(prefix)
    app.router.add_get("/dashboard", dashboard)
