"""deploy/grafana/zeroserve.json: an importable Grafana dashboard whose every query names
metrics that a live server's /metrics really has (after a few requests, one of them an error),
whichever --metrics-prefix the dashboard's ``prefix`` variable selects."""

from __future__ import annotations

import json
import os
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana", "zeroserve.json")
METRIC = re.compile(r"\$\{prefix\}:([A-Za-z_][A-Za-z0-9_]*)")
ANY_NAME = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict) -> dict[str, list[str]]:
    """Every PromQL expression, by the panel (or variable) it belongs to."""
    out = {p["title"]: [t["expr"] for t in p["targets"]] for p in panels(dashboard)}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out[f"variable {var['name']}"] = [var["query"]["query"]]
    return out


def test_the_dashboard_is_importable_grafana_json(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert [o["value"] for o in variables["prefix"]["options"]] == ["zeroserve", "vllm"]
    assert {"model_name", "replica"} <= variables.keys()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
    titles = " ".join(p["title"] for p in panels(dashboard)).lower()
    for topic in ["request rate", "first token", "inter-token", "tokens per second", "running", "kv cache",
                  "prefix cache hit rate", "errors by reason"]:  # fmt: skip
        assert topic in titles, topic
    for title, exprs in queries(dashboard).items():
        for expr in exprs:
            # every metric name goes through the prefix variable, so one dashboard reads both
            assert ANY_NAME.findall(expr.replace("${prefix}:", "")) == [], (title, expr)
            assert METRIC.findall(expr), (title, expr)


def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(dashboard, zeroserve_server):
    server = zeroserve_server
    assert server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 0})[0] == 400  # an error
    for i in range(3):
        status, body = server.post("/v1/completions", {"prompt": f"Count to {i + 3}:", "max_tokens": 6})
        assert status == 200, body
    status, body = server.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "n": 2}
    )
    assert status == 200, body
    status, text = server.get("/metrics")
    assert status == 200
    scraped = {s.name for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    missing = {
        title: sorted(
            f"zeroserve:{name}" for name in METRIC.findall(expr) if f"zeroserve:{name}" not in scraped
        )
        for title, exprs in queries(dashboard).items()
        for expr in exprs
    }
    missing = {title: names for title, names in missing.items() if names}
    assert not missing, f"queried but not in /metrics: {missing}"
