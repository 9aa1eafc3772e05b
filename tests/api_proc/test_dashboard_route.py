"""GET /dashboard: one self-contained page, its inline script and style allowed by hash in the
Content-Security-Policy, exempt from API keys exactly when it is in auth_exempt_paths."""

from __future__ import annotations

import base64
import hashlib
import re

from api_fake_engine import api_client

from zeroserve.shared.config import DEFAULTS


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_page_is_self_contained_and_its_csp_allows_exactly_its_inline_blocks():
    async with api_client(metrics_prefix="vllm") as client:
        r = await client.get("/dashboard")
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert 'data-prefix="vllm"' in page
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == csp_hash(script) and directives["style-src"] == csp_hash(style)
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    # nothing from another origin, nothing left to build
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "{{" not in page and 'fetch("metrics"' in script


async def test_the_page_needs_a_key_exactly_when_metrics_does():
    assert "/dashboard" in DEFAULTS.auth_exempt_paths and "/metrics" in DEFAULTS.auth_exempt_paths
    async with api_client(api_keys=["k"], auth_exempt_paths=list(DEFAULTS.auth_exempt_paths)) as client:
        assert (await client.get("/dashboard")).status == 200
        assert (await client.get("/metrics")).status == 200
    async with api_client(api_keys=["k"], auth_exempt_paths=["/health"]) as client:
        assert (await client.get("/dashboard")).status == 401
        r = await client.get("/dashboard", headers={"Authorization": "Bearer k"})
        assert r.status == 200
