"""The audit trail on real processes with the default store (SQLite in --state-dir): 200 requests
from 3 tenants (completions, streams, n = 2, bad requests, dropped streams) leave one record
each with the usage the client saw; /admin/usage and `zeroserve usage` add them up; a tenant
over its token limit gets 429 while the others go on; --audit-content none keeps no text."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import start_server, zeroserve_command
from tests.engine.audit_workload import MARKER, check_records, expected_usage, run_mix
from zeroserve.api_proc.auth import derived_name

ADMIN = "admin-key-for-tests"
KEYS = {"acme": "k-acme", "beta": "k-beta", derived_name("k-plain"): "k-plain"}
KEYS_FILE = """
[tenants.acme]
key = "k-acme"
[tenants.beta]
key = "k-beta"
[tenants.capped]
key = "k-capped"
tokens_per_minute = 120
"""


@pytest.fixture(scope="module")
def audited():
    state = tempfile.mkdtemp(prefix="zs-audit-")
    keys = os.path.join(state, "keys.toml")
    with open(keys, "w") as f:
        f.write(KEYS_FILE)
    os.chmod(keys, 0o600)
    server = start_server(
        "--api-keys-file", keys, "--api-key", "k-plain", "--admin-key", ADMIN, "--state-dir", state,
        "--audit-content", "none", "--max-num-seqs", "16",
        api_key=None,
    )  # fmt: skip
    yield server, state
    code = server.stop()
    shutil.rmtree(state, ignore_errors=True)
    assert code == 0, server.log()


def admin_get(server, path: str, key: str = ADMIN) -> tuple[int, dict]:
    req = urllib.request.Request(server.base_url + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def db_rows(state: str) -> list[dict]:
    with sqlite3.connect(os.path.join(state, "audit.db")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM zeroserve_audit")]


def wait_rows(state: str, at_least: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = db_rows(state)
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_200_requests_from_3_tenants_leave_one_exact_record_each(audited):
    server, state = audited
    outcomes = asyncio.run(run_mix(server.base_url, KEYS, 200, disconnecting=(derived_name("k-plain"),)))
    assert sum(o.kind == "disconnect" for o in outcomes) >= 10 and sum(o.kind == "n2" for o in outcomes) >= 40
    ids = {o.request_id for o in outcomes}
    rows = [r for r in wait_rows(state, 200) if r["request_id"] in ids]
    check_records(outcomes, rows)
    for row in rows:
        assert row["source"] == "http" and row["client"] == "127.0.0.1" and row["e2e_s"] > 0
        assert row["prompt_text"] is row["output_text"] is row["prompt_sha256"] is None

    status, usage = admin_get(server, "/admin/usage?group_by=tenant")
    assert status == 200, usage
    totals = {d["tenant"]: d for d in usage["data"]}
    for tenant in ("acme", "beta"):  # no dropped streams: every token is in the client's usage
        want = expected_usage(outcomes, tenant)
        got = totals[tenant]
        assert {k: got[k] for k in want} == want, (tenant, got, want)
        assert got["errors"] == sum(o.tenant == tenant and o.kind == "bad" for o in outcomes)
    plain = derived_name("k-plain")
    assert totals[plain]["requests"] == sum(o.tenant == plain for o in outcomes)

    # `zeroserve usage` prints the same
    env = dict(os.environ, ZEROSERVE_ADMIN_KEY=ADMIN)
    cli = subprocess.run(
        [*zeroserve_command(), "usage", "--url", server.base_url, "--format", "csv"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    table = {r["tenant"]: r for r in csv.DictReader(io.StringIO(cli.stdout))}
    for tenant in ("acme", "beta"):
        assert int(table[tenant]["completion_tokens"]) == totals[tenant]["completion_tokens"]
        assert int(table[tenant]["requests"]) == totals[tenant]["requests"]

    # and one record by its id through the admin API
    some = outcomes[0]
    status, found = admin_get(server, f"/admin/audit?request_id={some.request_id}")
    assert status == 200 and [r["request_id"] for r in found["data"]] == [some.request_id]


def test_a_tenant_over_its_token_limit_gets_429_and_the_others_are_unaffected(audited):
    server, state = audited

    def post(key: str) -> tuple[int, dict]:
        body = json.dumps({"prompt": "count to ten", "max_tokens": 30, "temperature": 0}).encode()
        req = urllib.request.Request(
            server.base_url + "/v1/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    results = [post("k-capped") for _ in range(5)]
    statuses = [s for s, _ in results]
    assert statuses[0] == 200 and 429 in statuses, statuses
    retry_after = int(next(h for s, h in results if s == 429)["Retry-After"])
    assert 1 <= retry_after <= 60
    assert [post("k-acme")[0] for _ in range(4)] == [200] * 4
    rows = [r for r in wait_rows(state, 1) if r["tenant"] == "capped"]
    assert sorted(r["status"] for r in rows) == sorted(statuses)
    assert all(r["error_type"] == "rate_limit_exceeded" for r in rows if r["status"] == 429)


def test_admin_api_checks_its_key_and_parameters(audited):
    server, _ = audited
    assert admin_get(server, "/admin/usage", key="k-acme")[0] == 401
    status, body = admin_get(server, "/admin/usage?group_by=colour")
    assert status == 400 and body["error"]["param"] == "group_by"


def test_batch_lines_are_recorded_in_the_same_store(audited, tmp_path):
    server, state = audited
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"{MARKER} batch {i}", "max_tokens": 2}}
        for i in range(3)
    ]  # fmt: skip
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run(
        [*zeroserve_command(), "batch", str(inp), str(out), "--address", server.tokenizer_address,
         "--state-dir", state, "--audit-content", "none"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = {r["response"]["request_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    rows = {r["request_id"]: r for r in db_rows(state) if r["source"] == "batch"}
    assert rows.keys() >= results.keys() and len(results) == 3
    for rid, result in results.items():
        usage = result["response"]["body"]["usage"]
        assert (rows[rid]["prompt_tokens"], rows[rid]["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert rows[rid]["client"] == "batch" and rows[rid]["status"] == 200


def test_audit_content_none_leaves_no_text_on_disk(audited):
    server, state = audited
    wait_rows(state, 200)
    found = []
    for root, _, files in os.walk(state):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if MARKER.encode() in f.read():
                    found.append(name)
    assert found == [], f"prompt text found in {found}"
