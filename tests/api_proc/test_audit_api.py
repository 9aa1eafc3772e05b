"""Named keys, the keys file, per-tenant limits, the admin API and per-tenant metrics, on the
real app over the fake engine (api_fake_engine.py), with the audit trail in an SQLite file."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import pytest
from api_fake_engine import api_client

from zeroserve.api_proc.auth import KeysError, build_tenants, derived_name, split_key

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
ADMIN = "adm-secret"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def audited(tmp_path, **overrides) -> dict:
    """api_client overrides for an app that records into tmp_path/audit.db."""
    state = str(tmp_path / "state")
    values = dict(
        audit_store="sqlite:///" + str(tmp_path / "state" / "audit.db").lstrip("/"),
        state_dir=state,
        admin_key=ADMIN,
    )
    values.update(overrides)
    return values


def keys_file(tmp_path, text: str, name: str = "keys.toml", mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


async def audit_rows(client, **query) -> list[dict]:
    resp = await client.get("/admin/audit", params=query, headers=bearer(ADMIN))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


# --------------------------------------------------------------------------- keys


def test_key_forms_and_derived_names():
    assert split_key("acme:sk-1") == ("acme", "sk-1")
    assert split_key("sk-plain") == (derived_name("sk-plain"), "sk-plain")
    assert derived_name("sk-plain") == "key-" + hashlib.sha256(b"sk-plain").hexdigest()[:8]
    assert split_key("has space:x")[1] == "has space:x"  # not a tenant name: the whole is the key
    with pytest.raises(KeysError, match="two tenants"):
        build_tenants(["a:same", "b:same"])


def test_keys_file_must_be_private_and_well_formed(tmp_path):
    good = '[tenants.acme]\nkeys = ["k1", "k2"]\ntokens_per_minute = 100\n[tenants.beta]\nkey = "k3"\n'
    tenants = build_tenants(["ops:k4"], keys_file(tmp_path, good))
    assert tenants.names == ["acme", "beta", "ops"]
    assert tenants.match("k2").name == "acme" and tenants.match("k2").tokens_per_minute == 100
    assert tenants.match("nope") is None
    with pytest.raises(KeysError, match=r"mode 0644.*chmod 600"):
        build_tenants([], keys_file(tmp_path, good, "open.toml", 0o644))
    as_json = {"tenants": {"acme": {"key": "k1", "requests_per_minute": 5}}}
    tenants = build_tenants([], keys_file(tmp_path, json.dumps(as_json), "keys.json"))
    assert tenants.match("k1").requests_per_minute == 5
    for bad, says in [
        ('[tenants.acme]\nkey = "k"\ntokens_per_minute = -1\n', "positive integer"),
        ('[tenants.acme]\nkey = "k"\nburst = 3\n', "unknown field"),
        ("[tenants.acme]\n", "give key"),
        ('[tenants."no spaces"]\nkey = "k"\n', "a name is"),
        ("not toml [", "cannot read"),
    ]:
        with pytest.raises(KeysError, match=says):
            build_tenants([], keys_file(tmp_path, bad, "bad.toml"))


async def test_an_open_keys_file_stops_the_api_at_start(tmp_path):
    path = keys_file(tmp_path, '[tenants.a]\nkey = "k"\n', mode=0o640)
    with pytest.raises(SystemExit, match="chmod 600"):
        async with api_client(api_keys_file=path):
            pass


async def test_requests_are_recorded_under_their_tenant_and_auth_errors_are_unchanged(tmp_path):
    async with api_client(**audited(tmp_path, api_keys=["acme:k-acme", "k-plain"])) as client:
        ok = await client.post(CMPL, json={"prompt": "a b", "max_tokens": 2}, headers=bearer("k-acme"))
        assert ok.status == 200
        ok = await client.post(CMPL, json={"prompt": "a b", "max_tokens": 3}, headers=bearer("k-plain"))
        assert ok.status == 200
        wrong = await client.post(CMPL, json={"prompt": "x"}, headers=bearer("k-wrong"))
        assert wrong.status == 401 and (await wrong.json())["error"]["code"] == "invalid_api_key"
        rows = await audit_rows(client)
    by_status = sorted((r["status"], r["tenant"], r["completion_tokens"]) for r in rows)
    assert by_status == [(200, "acme", 2), (200, derived_name("k-plain"), 3), (401, None, 0)]
    assert all("k-acme" not in json.dumps(r) for r in rows)  # a key is never stored


# --------------------------------------------------------------------------- admin


async def test_admin_is_404_without_an_admin_key(tmp_path):
    async with api_client(**audited(tmp_path, admin_key=None, api_keys=["acme:k"])) as client:
        for path in ("/admin/usage", "/admin/audit", "/admin/anything"):
            resp = await client.get(path, headers=bearer("k"))
            assert resp.status == 404, path
        assert (await client.get("/admin/usage", headers=bearer(ADMIN))).status == 404


async def test_admin_key_is_checked_and_is_not_an_api_key(tmp_path):
    async with api_client(**audited(tmp_path, api_keys=["acme:k"])) as client:
        for headers in ({}, bearer("wrong"), bearer("k"), {"Authorization": f"Basic {ADMIN}"}):
            resp = await client.get("/admin/usage", headers=headers)
            assert resp.status == 401, headers
            err = (await resp.json())["error"]
            assert err["code"] == "invalid_admin_key" and ADMIN not in err["message"]
        assert (await client.get("/admin/usage", headers=bearer(ADMIN))).status == 200
        # and the admin key is no API key
        assert (await client.post(CMPL, json={"prompt": "x"}, headers=bearer(ADMIN))).status == 401


@pytest.mark.parametrize(
    "path, query, param",
    [
        ("/admin/usage", {"since": "yesterday"}, "since"),
        ("/admin/usage", {"until": "2026-13-45"}, "until"),
        ("/admin/usage", {"group_by": "color"}, "group_by"),
        ("/admin/usage", {"since": "200", "until": "100"}, "until"),
        ("/admin/usage", {"tenants": "a"}, "tenants"),
        ("/admin/audit", {"limit": "0"}, "limit"),
        ("/admin/audit", {"limit": "many"}, "limit"),
        ("/admin/audit", {"limit": "1001"}, "limit"),
        ("/admin/audit", {"since": "noon"}, "since"),
        ("/admin/usage", {"since": "nan"}, "since"),
        ("/admin/audit", {"until": "inf"}, "until"),
        ("/admin/audit", {"request_id": "has\x00nul"}, "request_id"),
        ("/admin/audit", {"tenant": "no spaces here"}, "tenant"),
        ("/admin/usage", {"tenant": "x" * 65}, "tenant"),
    ],
)
async def test_admin_bad_parameters_are_400_naming_the_field(tmp_path, path, query, param):
    async with api_client(**audited(tmp_path)) as client:
        resp = await client.get(path, params=query, headers=bearer(ADMIN))
        assert resp.status == 400
        err = (await resp.json())["error"]
        assert err["param"] == param and f"`{param}`" in err["message"]


async def test_usage_groups_and_time_ranges(tmp_path):
    async with api_client(**audited(tmp_path, api_keys=["acme:ka", "beta:kb"])) as client:
        for key, max_tokens in (("ka", 2), ("ka", 3), ("kb", 4)):
            resp = await client.post(
                CMPL, json={"prompt": "w1 w2 w3", "max_tokens": max_tokens}, headers=bearer(key)
            )
            assert resp.status == 200
        resp = await client.get("/admin/usage", params={"group_by": "tenant"}, headers=bearer(ADMIN))
        data = (await resp.json())["data"]
        assert [(d["tenant"], d["requests"], d["completion_tokens"]) for d in data] == [
            ("acme", 2, 5),
            ("beta", 1, 4),
        ]
        assert all(d["prompt_tokens"] == 3 * d["requests"] for d in data)
        resp = await client.get(
            "/admin/usage", params={"group_by": "day", "since": "2000-01-01"}, headers=bearer(ADMIN)
        )
        (day,) = (await resp.json())["data"]
        assert day["requests"] == 3
        resp = await client.get(
            "/admin/usage", params={"until": "2000-01-01T00:00:00Z"}, headers=bearer(ADMIN)
        )
        assert (await resp.json())["data"] == []


async def test_audit_off_says_so(tmp_path):
    async with api_client(admin_key=ADMIN) as client:
        resp = await client.get("/admin/usage", headers=bearer(ADMIN))
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "audit_off"


async def test_a_fresh_store_answers_the_first_query_with_nothing_not_503(tmp_path):
    async with api_client(**audited(tmp_path)) as client:
        usage = await client.get("/admin/usage", headers=bearer(ADMIN))
        assert usage.status == 200, await usage.text()
        assert (await usage.json())["data"] == []
        # the trail held nothing but the first query itself (which usage sums leave out)
        [(endpoint, status)] = [(r["endpoint"], r["status"]) for r in await audit_rows(client)]
        assert (endpoint, status) == ("/admin/usage", 200)


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("content", ["none", "hash", "full"])
async def test_audit_content_modes(tmp_path, content):
    async with api_client(**audited(tmp_path, audit_content=content)) as client:
        resp = await client.post(CMPL, json={"prompt": "secret words", "max_tokens": 2})
        text = (await resp.json())["choices"][0]["text"]
        (row,) = await audit_rows(client)
    sha = hashlib.sha256
    expected = {
        "none": (None, None, None, None),
        "hash": (None, None, sha(b"secret words").hexdigest(), sha(text.encode()).hexdigest()),
        "full": ("secret words", text, sha(b"secret words").hexdigest(), sha(text.encode()).hexdigest()),
    }[content]
    assert (row["prompt_text"], row["output_text"], row["prompt_sha256"], row["output_sha256"]) == expected
    raw = open(tmp_path / "state" / "audit.db", "rb").read()
    with sqlite3.connect(tmp_path / "state" / "audit.db") as db:  # the WAL's pages into the file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = open(tmp_path / "state" / "audit.db", "rb").read()
    assert (b"secret words" in raw) == (content == "full")


# --------------------------------------------------------------------------- limits


async def test_a_tenant_over_its_token_limit_gets_429_and_the_others_do_not(tmp_path):
    path = keys_file(
        tmp_path,
        '[tenants.small]\nkey = "k-small"\ntokens_per_minute = 60\n[tenants.big]\nkey = "k-big"\n',
    )
    body = {"prompt": "one two three", "max_tokens": 20}
    async with api_client(**audited(tmp_path, api_keys_file=path)) as client:
        first = await client.post(CMPL, json=body, headers=bearer("k-small"))
        assert first.status == 200  # estimate ~12 + 20 of 60; usage 3 + 20 charged
        second = await client.post(CMPL, json=body, headers=bearer("k-small"))
        assert second.status == 200
        third = await client.post(CMPL, json=body, headers=bearer("k-small"))
        assert third.status == 429
        err = (await third.json())["error"]
        assert err["code"] == "rate_limit_exceeded" and "60 tokens per minute" in err["message"]
        assert 1 <= int(third.headers["Retry-After"]) <= 60
        for _ in range(5):  # the other tenant has no limit
            assert (await client.post(CMPL, json=body, headers=bearer("k-big"))).status == 200
        rows = await audit_rows(client, tenant="small")
    assert sorted(r["status"] for r in rows) == [200, 200, 429]


async def test_requests_per_minute_and_usage_correction(tmp_path):
    path = keys_file(tmp_path, '[tenants.r]\nkey = "k"\nrequests_per_minute = 2\n')
    async with api_client(**audited(tmp_path, api_keys_file=path)) as client:
        statuses = [(await client.post(CMPL, json={"prompt": "x", "max_tokens": 1}, headers=bearer("k"))).status
                    for _ in range(3)]  # fmt: skip
        assert statuses == [200, 200, 429]
        assert (await client.get("/v1/models", headers=bearer("k"))).status == 200  # only generation counts


async def test_an_estimate_below_usage_is_charged_at_the_end(tmp_path):
    """No max_tokens: the estimate is the body alone; the usage it then owes makes the next wait."""
    path = keys_file(tmp_path, '[tenants.t]\nkey = "k"\ntokens_per_minute = 40\n')
    async with api_client(**audited(tmp_path, api_keys_file=path)) as client:
        long = await client.post(CMPL, json={"prompt": "a", "max_tokens": 39}, headers=bearer("k"))
        assert long.status == 200  # 39 + 1 tokens: the bucket is now empty
        short = await client.post(CMPL, json={"prompt": "a"}, headers=bearer("k"))
        assert short.status == 429


# --------------------------------------------------------------------------- metrics


async def test_per_tenant_metrics(tmp_path):
    async with api_client(**audited(tmp_path, api_keys=["acme:ka", "beta:kb"])) as client:
        for key in ("ka", "ka", "kb"):
            await client.post(CMPL, json={"prompt": "p q", "max_tokens": 2}, headers=bearer(key))
        text = await (await client.get("/metrics")).text()
    assert 'zeroserve:tenant_requests_total{model_name="test-model",tenant="acme"} 2.0' in text
    assert 'zeroserve:tenant_generation_tokens_total{model_name="test-model",tenant="beta"} 2.0' in text
    assert 'zeroserve:tenant_prompt_tokens_total{model_name="test-model",tenant="acme"} 4.0' in text


# --------------------------------------------------------------------------- durability


async def test_a_streams_record_is_on_disk_before_its_last_bytes_and_recorded_once(tmp_path):
    from zeroserve.api_proc.admin import AUDIT

    async with api_client(**audited(tmp_path)) as client:
        writer = client.server.app[AUDIT].writer
        body = {"prompt": "a b", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        resp = await client.post(CMPL, json=body, headers={"X-Request-Id": "held-stream"})
        durable_at_done = None
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                durable_at_done = writer._durable
        assert durable_at_done == 1  # fsynced before [DONE] reached the client
        whole = await client.post(
            CMPL, json={"prompt": "a b", "max_tokens": 2}, headers={"X-Request-Id": "whole"}
        )
        assert whole.status == 200 and writer._durable == 2  # and before a whole answer's status line
        rows = await audit_rows(client)
    streamed = [r for r in rows if r["request_id"] == "held-stream"]
    assert len(streamed) == 1 and streamed[0]["stream"] is True and streamed[0]["completion_tokens"] == 3
    assert streamed[0]["status"] == 200 and streamed[0]["finish_reason"] == "length"


async def test_zeroserve_usage_prints_the_admin_apis_numbers(tmp_path):
    import argparse
    import asyncio

    from zeroserve.launcher.usage import fetch, render

    async with api_client(**audited(tmp_path, api_keys=["acme:ka", "beta:kb"])) as client:
        for key in ("ka", "kb", "kb"):
            await client.post(CMPL, json={"prompt": "p q", "max_tokens": 2}, headers=bearer(key))
        args = argparse.Namespace(
            url=str(client.make_url("")), admin_key=ADMIN, group_by="tenant", since=None, until=None,
            tenant=None, timeout=10.0,
        )  # fmt: skip
        result = await asyncio.to_thread(fetch, args)
        args.admin_key = "wrong"
        with pytest.raises(SystemExit, match="401"):
            await asyncio.to_thread(fetch, args)
    table = render(result, "table").splitlines()
    assert table[0].split() == ["tenant", "requests", "errors", "prompt_tokens", "completion_tokens",
                                "total_tokens", "cached_tokens"]  # fmt: skip
    assert table[1].split()[:2] == ["acme", "1"] and table[2].split()[:2] == ["beta", "2"]
    assert table[3].split() == ["TOTAL", "3", "0", "6", "6", "12", "0"]
    assert render(result, "csv").splitlines()[2] == "beta,2,0,4,4,8,0"
