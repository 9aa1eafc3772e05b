"""The audit trail in a real PostgreSQL (a throwaway cluster this test starts), written by two api
processes at once: the same checks as with SQLite, one record per request with the client's
usage, totals per tenant from /admin/usage; and a database outage spools and replays."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.request

import pytest

from tests.conftest import start_server
from tests.engine.audit_workload import check_records, expected_usage, run_mix
from tests.engine.pg_cluster import Cluster

psycopg = pytest.importorskip("psycopg")

ADMIN = "pg-admin-key"
KEYS = {"acme": "k-acme", "beta": "k-beta", "gamma": "k-gamma"}


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster().start()
    cluster.wait_ready()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def server(cluster):
    state = tempfile.mkdtemp(prefix="zs-audit-pg-")
    keys = [arg for name, key in KEYS.items() for arg in ("--api-key", f"{name}:{key}")]
    server = start_server(
        *keys, "--api-workers", "2", "--audit-db", cluster.url, "--admin-key", ADMIN, "--state-dir", state,
        "--max-num-seqs", "16",
        api_key=None,
    )  # fmt: skip
    server.state = state
    yield server
    code = server.stop()
    shutil.rmtree(state, ignore_errors=True)
    assert code == 0, server.log()


def rows_of(cluster: Cluster, ids: set[str], at_least: int, timeout: float = 30.0) -> list[dict]:
    from psycopg.rows import dict_row

    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(cluster.url, row_factory=dict_row) as db:
            rows = [
                r for r in db.execute("SELECT * FROM zeroserve_audit").fetchall() if r["request_id"] in ids
            ]
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def admin_get(server, path: str) -> dict:
    req = urllib.request.Request(server.base_url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_two_api_processes_record_every_request_in_postgres(cluster, server):
    spools = sorted(f.split(".")[0] for f in os.listdir(os.path.join(server.state, "audit-spool")))
    assert spools == ["api-0", "api-1"]  # two writers, each with its own spool
    outcomes = asyncio.run(run_mix(server.base_url, KEYS, 120, disconnecting=("gamma",)))
    ids = {o.request_id for o in outcomes}
    rows = rows_of(cluster, ids, len(ids))
    check_records(outcomes, rows)
    with psycopg.connect(cluster.url) as db:
        assert db.execute("SELECT component, version FROM zeroserve_schema_version").fetchall() == [
            ("audit", 1)
        ]
    totals = {d["tenant"]: d for d in admin_get(server, "/admin/usage?group_by=tenant")["data"]}
    for tenant in ("acme", "beta"):
        want = expected_usage(outcomes, tenant)
        assert {k: totals[tenant][k] for k in want} == want, tenant
    assert totals["gamma"]["requests"] == sum(o.tenant == "gamma" for o in outcomes)


def test_an_outage_spools_and_the_records_arrive_when_the_database_is_back(cluster, server):
    cluster.run(cluster.pg_ctl, "-D", cluster.data, "-m", "immediate", "-w", "stop")
    try:
        outcomes = asyncio.run(run_mix(server.base_url, {"acme": "k-acme"}, 12))
        assert all(o.status in (200, 400) for o in outcomes)  # serving goes on without the database
        spooled = sum(
            os.path.getsize(os.path.join(server.state, "audit-spool", f))
            for f in os.listdir(os.path.join(server.state, "audit-spool"))
        )
        assert spooled > 0
    finally:
        opts = f"-p {cluster.port} -k {cluster.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        cluster.run(cluster.pg_ctl, "-D", cluster.data, "-l", cluster.log, "-o", opts, "-w", "start")
    ids = {o.request_id for o in outcomes}
    rows = rows_of(cluster, ids, len(ids), timeout=60)  # the writers retry at most 30 s apart
    check_records(outcomes, rows)
