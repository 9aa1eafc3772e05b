"""The audit trail's parts without a server: spool frames and adoption, the SQLite store's schema
and queries, and the writer's outage, replay and overflow behaviour."""

from __future__ import annotations

import logging
import os
import sqlite3
import time

import msgspec
import pytest

from zeroserve.api_proc.audit.record import AuditRow, row_from
from zeroserve.api_proc.audit.spool import FRAME, Spool, frame
from zeroserve.api_proc.audit.store import (
    SCHEMA_VERSION,
    SQLiteStore,
    StoreError,
    open_store,
    redact,
    resolve_url,
)
from zeroserve.api_proc.audit.writer import AuditWriter
from zeroserve.api_proc.request_log import RequestRecord

DAY = 86400.0


def record(i: int = 0, **kw) -> RequestRecord:
    values = dict(
        request_id=f"req-{i}",
        started_at=1_700_000_000.0 + i,
        endpoint="/v1/completions",
        method="POST",
        status=200,
        error_type=None,
        tenant="acme",
        client="127.0.0.1",
        model="m",
        version=None,
        replica="r0",
        stream=False,
        prompt_tokens=3,
        completion_tokens=5,
        cached_tokens=1,
        finish_reason="length",
        ttft_s=0.01,
        e2e_s=0.05,
        prompt_text="the prompt",
        output_text="the output",
    )
    values.update(kw)
    return RequestRecord(**values)


def encode(row: AuditRow) -> bytes:
    return msgspec.msgpack.encode(row)


def rows_in(path: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT request_id, tenant, prompt_tokens FROM zeroserve_audit ORDER BY started_at"
        ).fetchall()


# --------------------------------------------------------------------------- content modes


def test_content_modes_keep_no_text_a_hash_or_everything():
    import hashlib

    none = row_from(record(), "none")
    assert (none.prompt_text, none.output_text, none.prompt_sha256, none.output_sha256) == (None,) * 4
    hashed = row_from(record(), "hash")
    assert hashed.prompt_text is None and hashed.output_text is None
    assert hashed.prompt_sha256 == hashlib.sha256(b"the prompt").hexdigest()
    assert hashed.output_sha256 == hashlib.sha256(b"the output").hexdigest()
    full = row_from(record(), "full")
    assert (full.prompt_text, full.output_text) == ("the prompt", "the output")
    assert row_from(record(), "none").record_id != none.record_id  # each row its own key


# --------------------------------------------------------------------------- spool


def test_spool_appends_reads_back_and_cuts_back_when_committed(tmp_path):
    spool = Spool(str(tmp_path), "api-0")
    assert spool.open() == 0
    assert spool.append([b"one", b"two"]) and spool.append([b"three"])
    frames, offset = spool.read_pending()
    assert frames == [b"one", b"two", b"three"] and offset == spool.end
    spool.commit(offset)
    assert spool.pending_bytes == 0
    spool.close()
    assert not os.listdir(tmp_path)  # everything was in the database: the file is gone


def test_a_killed_writers_frames_are_found_again_and_a_torn_tail_is_dropped(tmp_path, caplog):
    spool = Spool(str(tmp_path), "api-0")
    spool.open()
    spool.append([b"kept-1", b"kept-2"])
    os.pwrite(spool.fd, frame(b"torn-frame")[:7], spool.end)  # a write cut short by the kill
    os.close(spool.fd)  # the process died: its lock goes with it
    again = Spool(str(tmp_path), "api-0")
    with caplog.at_level(logging.WARNING, "zeroserve.audit"):
        assert again.open() == 2
    assert "torn tail of 7 bytes" in caplog.text
    assert again.read_pending()[0] == [b"kept-1", b"kept-2"]


def test_orphans_are_adopted_but_a_live_writers_file_is_left_alone(tmp_path):
    live = Spool(str(tmp_path), "api-1")
    live.open()
    live.append([b"live"])
    dead = Spool(str(tmp_path), "api-2")
    dead.open()
    dead.append([b"orphan-1", b"orphan-2"])
    os.close(dead.fd)  # killed
    mine = Spool(str(tmp_path), "api-0")
    assert mine.open() == 2
    assert mine.read_pending()[0] == [b"orphan-1", b"orphan-2"]
    assert sorted(os.listdir(tmp_path)) == ["api-0.spool", "api-1.spool"]  # the orphan's file is gone
    # a second writer of a name in use takes the next file instead of sharing one
    twin = Spool(str(tmp_path), "api-0")
    twin.open()
    assert twin.path.endswith("api-0.1.spool")


def test_only_spools_of_the_same_store_are_adopted(tmp_path):
    for store in ("sqlite:///a.db", "postgresql://h/db"):
        dead = Spool(str(tmp_path), "api-5", store=store)
        dead.open()
        dead.append([store.encode()])
        os.close(dead.fd)
    mine = Spool(str(tmp_path), "api-0", store="postgresql://h/db")
    assert mine.open() == 1
    assert mine.read_pending()[0] == [b"postgresql://h/db"]
    assert len(os.listdir(tmp_path)) == 2  # the SQLite deployment's spool waits for its own


def test_the_spool_refuses_a_batch_past_its_bound(tmp_path):
    spool = Spool(str(tmp_path), "api-0", max_bytes=3 * (FRAME.size + 10))
    spool.open()
    assert spool.append([b"x" * 10, b"y" * 10])
    assert not spool.append([b"z" * 10, b"w" * 10])  # the whole batch, not half of it
    assert spool.read_pending()[0] == [b"x" * 10, b"y" * 10]
    spool.commit(spool.end)
    assert spool.append([b"z" * 10, b"w" * 10])  # room again once the database took the rest


# --------------------------------------------------------------------------- store


def test_sqlite_store_schema_is_versioned_idempotent_and_private(tmp_path):
    path = str(tmp_path / "state" / "audit.db")
    store = SQLiteStore(path)
    rows = [row_from(record(i), "none") for i in range(3)]
    store.insert(rows)
    store.insert(rows)  # a replay: the same record_ids again
    store.close()
    store = SQLiteStore(path)  # a second start migrates nothing
    store.close()
    assert len(rows_in(path)) == 3
    assert os.stat(path).st_mode & 0o077 == 0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = db.execute("SELECT component, version FROM zeroserve_schema_version").fetchall()
        assert versions == [("audit", SCHEMA_VERSION)]
        db.execute("UPDATE zeroserve_schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this zeroserve"):
        SQLiteStore(path)


def test_usage_groups_and_records_queries(tmp_path):
    store = SQLiteStore(str(tmp_path / "audit.db"))
    base = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    records = [
        record(0, tenant="acme", prompt_tokens=3, completion_tokens=5, cached_tokens=2),
        record(
            1,
            tenant="acme",
            prompt_tokens=4,
            completion_tokens=6,
            status=429,
            error_type="rate_limit_exceeded",
        ),
        record(2, tenant="beta", prompt_tokens=10, completion_tokens=1, model="other"),
        record(3, tenant="beta", started_at=base + DAY, prompt_tokens=1, completion_tokens=1),
    ]
    store.insert([row_from(r, "none") for r in records])
    by_tenant = store.usage(None, None, "tenant")
    assert by_tenant == [
        {"tenant": "acme", "requests": 2, "errors": 1, "prompt_tokens": 7, "completion_tokens": 11,
         "total_tokens": 18, "cached_tokens": 3},
        {"tenant": "beta", "requests": 2, "errors": 0, "prompt_tokens": 11, "completion_tokens": 2,
         "total_tokens": 13, "cached_tokens": 2},
    ]  # fmt: skip
    assert [(r["day"], r["requests"]) for r in store.usage(None, None, "day")] == [
        ("2023-11-14", 3),
        ("2023-11-15", 1),
    ]
    assert [(r["model"], r["requests"]) for r in store.usage(None, None, "model")] == [("m", 3), ("other", 1)]
    assert [r["requests"] for r in store.usage(base + 1, base + 3, "tenant")] == [1, 1]  # [since, until)
    assert store.usage(None, None, "tenant", tenant="beta")[0]["requests"] == 2
    (one,) = store.records(request_id="req-2")
    assert one["tenant"] == "beta" and one["stream"] is False and one["replica"] == "r0"
    assert [r["request_id"] for r in store.records(tenant="acme")] == ["req-1", "req-0"]  # newest first
    assert len(store.records(limit=2)) == 2


def test_audit_db_urls():
    assert resolve_url("", "/var/lib/zs") == "sqlite:///var/lib/zs/audit.db"
    assert resolve_url("off", "/x") is None
    assert resolve_url("postgresql://u:p@h/db", "/x") == "postgresql://u:p@h/db"
    assert resolve_url("/tmp/a.db", "/x") == "sqlite:///tmp/a.db"
    with pytest.raises(StoreError, match="use sqlite:///PATH") as e:
        resolve_url("mysql://u:secret@h/db", "/x")
    assert "secret" not in str(e.value)
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db?sslmode=require&password=secret") == (
        "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert redact("sqlite:///var/lib/z/audit.db") == "sqlite:///var/lib/z/audit.db"


# --------------------------------------------------------------------------- writer


async def wait_for(condition, timeout: float = 10.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_writer_spools_through_an_outage_and_stores_everything_when_it_ends(tmp_path, monkeypatch):
    import zeroserve.api_proc.audit.writer as writer_mod

    monkeypatch.setattr(writer_mod, "BACKOFF_START_S", 0.05)
    blocked = tmp_path / "db"
    blocked.write_text("a file where the database's directory must go: the store cannot open")
    url = "sqlite:///" + str(blocked / "audit.db").lstrip("/")
    writer = AuditWriter(url, Spool(str(tmp_path / "spool"), "api-0"), "none")
    writer.start()
    try:
        for i in range(20):
            writer.submit(record(i))
        await writer.sync()  # on disk, though the database is away
        await wait_for(lambda: writer.store_error is not None)
        assert writer.spool.pending_bytes > 0
        assert not await writer.stored(timeout=0.2)
        blocked.unlink()  # the database comes back
        assert await writer.stored(timeout=10)
        assert len(rows_in(str(blocked / "audit.db"))) == 20
        assert writer.spool.pending_bytes == 0
    finally:
        writer.close()


async def test_writer_replays_a_dead_writers_spool_once(tmp_path):
    url = "sqlite:///" + str(tmp_path / "audit.db").lstrip("/")
    spool_dir = str(tmp_path / "spool")
    dead = Spool(spool_dir, "api-3")
    dead.open()
    rows = [row_from(record(i), "none") for i in range(5)]
    dead.append([encode(r) for r in rows])
    open_store(url).insert(rows[:2])  # the dead writer had stored the first two already
    os.close(dead.fd)
    writer = AuditWriter(url, Spool(spool_dir, "api-0"), "none")
    writer.start()
    try:
        writer.submit(record(99))
        assert await writer.stored(timeout=10)
    finally:
        writer.close()
    assert [r[0] for r in rows_in(str(tmp_path / "audit.db"))] == [*(f"req-{i}" for i in range(5)), "req-99"]
    assert os.listdir(spool_dir) == []


async def test_a_full_spool_drops_counts_and_logs_an_error(tmp_path, caplog):
    blocked = tmp_path / "db"
    blocked.write_text("not a directory")
    url = "sqlite:///" + str(blocked / "audit.db").lstrip("/")
    dropped = []
    one_row = len(frame(encode(row_from(record(0), "none"))))
    spool = Spool(str(tmp_path / "spool"), "api-0", max_bytes=3 * one_row + 10)
    writer = AuditWriter(url, spool, "none", on_dropped=dropped.append)
    writer.start()
    try:
        with caplog.at_level(logging.ERROR, "zeroserve.audit"):
            for i in range(8):
                writer.submit(record(i))
                await writer.sync()  # one batch per record: each is judged against the bound
            writer.close()
    finally:
        writer.close()
    assert sum(dropped) == 5 and writer.dropped == 5
    assert "is full" in caplog.text and "dropped" in caplog.text


async def test_retention_removes_old_records(tmp_path):
    url = "sqlite:///" + str(tmp_path / "audit.db").lstrip("/")
    writer = AuditWriter(url, Spool(str(tmp_path / "spool"), "api-0"), "none", retention_days=1.0)
    writer.start()
    try:
        writer.submit(record(0, request_id="old"))  # 2023
        writer.submit(record(1, request_id="new", started_at=time.time()))
        assert await writer.stored(timeout=10)
        writer.close()  # the last pass prunes again
    finally:
        writer.close()
    assert [r[0] for r in rows_in(str(tmp_path / "audit.db"))] == ["new"]


async def test_a_hung_database_never_delays_the_spools_fsync(tmp_path, monkeypatch):
    """The database has its own thread: while an insert hangs, records still reach the spool
    (sync() returns at once, not after the watchdog's SYNC_TIMEOUT_S), and are stored after."""
    import threading

    import zeroserve.api_proc.audit.writer as writer_mod

    release = threading.Event()
    inserted: list = []

    class HungStore:
        def insert(self, rows):
            release.wait(30)  # a database stuck behind a lock, or a partition
            inserted.extend(rows)

        def prune(self, before):
            return 0

        def close(self):
            pass

    monkeypatch.setattr(writer_mod, "open_store", lambda url: HungStore())
    writer = AuditWriter("sqlite:///unused", Spool(str(tmp_path / "spool"), "api-0"), "none")
    writer.start()
    try:
        writer.submit(record(0))
        await writer.sync()
        await wait_for(lambda: writer._last_store > 0)  # the store thread is inside the hung insert
        started = time.monotonic()
        for i in range(1, 6):
            writer.submit(record(i))
            await writer.sync()
        assert time.monotonic() - started < 2.0  # fsyncs, not the watchdog's 5 s release
        assert not await writer.stored(timeout=0.2)
        release.set()
        assert await writer.stored(timeout=10)
        assert sorted(r.request_id for r in inserted) == [f"req-{i}" for i in range(6)]
    finally:
        release.set()
        writer.close()
