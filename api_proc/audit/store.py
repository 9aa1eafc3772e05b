"""Where audit rows end up: an SQLite file (WAL) or PostgreSQL (psycopg 3), one schema for both.

``--audit-db``:
    (empty)                  STATE_DIR/audit.db
    off                      no audit trail
    sqlite:///ABS/PATH.db    an SQLite file (a plain path works too)
    postgresql://...         PostgreSQL (also postgres://); user, password, host, dbname as libpq reads them

Schema (``zeroserve_schema_version`` holds one row per component; the audit's is ``audit``):
zeroserve creates it and migrates it forward on start, every step in one transaction under a
lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so api processes starting
together migrate once. A database written by a newer zeroserve (a higher version) is refused.

    zeroserve_audit: one row per request (api_proc/audit/record.py AuditRow), record_id the
    primary key, indexed by started_at, (tenant, started_at) and request_id.

Several writers share a store: SQLite in WAL mode with a busy timeout (one writer at a time,
each batch one short transaction), PostgreSQL by its nature.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from zeroserve.api_proc.audit.record import COLUMNS, AuditRow

log = logging.getLogger("zeroserve.audit")

SCHEMA_VERSION = 1
GROUPS = ("tenant", "model", "version", "day")
TABLE = "zeroserve_audit"
VERSIONS = "zeroserve_schema_version"
PG_LOCK = 0x7A65726F  # "zero": the advisory lock migrations take
BUSY_TIMEOUT_S = 30.0


class StoreError(Exception):
    """A --audit-db that cannot be used; the message says why (without the password)."""


def _schema_v1(real: str, boolean: str) -> list[str]:
    return [
        f"""CREATE TABLE {TABLE} (
            record_id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
            started_at {real} NOT NULL,
            source TEXT NOT NULL,
            tenant TEXT,
            client TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            method TEXT NOT NULL,
            model TEXT,
            version TEXT,
            replica TEXT,
            stream {boolean} NOT NULL,
            status INTEGER NOT NULL,
            error_type TEXT,
            finish_reason TEXT,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            ttft_s {real},
            e2e_s {real} NOT NULL,
            prompt_sha256 TEXT,
            output_sha256 TEXT,
            prompt_text TEXT,
            output_text TEXT
        )""",
        f"CREATE INDEX {TABLE}_started_at ON {TABLE} (started_at)",
        f"CREATE INDEX {TABLE}_tenant ON {TABLE} (tenant, started_at)",
        f"CREATE INDEX {TABLE}_request_id ON {TABLE} (request_id)",
    ]


def redact(url: str) -> str:
    """The URL without its password (user:PASSWORD@ or ?password=...), for messages and logs."""
    parts = urlsplit(url)
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else item
        for item in parts.query.split("&")
        for k in [item.partition("=")[0]]
    )
    if parts.password is None and query == parts.query:
        return url  # (urlunsplit would also drop sqlite:///'s empty host)
    netloc = (
        parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def resolve_url(audit_db: str, state_dir: str) -> str | None:
    """The store URL of ``--audit-db`` (None: off)."""
    if audit_db == "off":
        return None
    if not audit_db:
        return "sqlite:///" + os.path.join(state_dir, "audit.db").lstrip("/")
    if audit_db.startswith(("postgresql://", "postgres://", "sqlite:///")):
        return audit_db
    if "://" in audit_db:
        raise StoreError(
            f"--audit-db {redact(audit_db)}: use sqlite:///PATH, postgresql://..., a file path, or off"
        )
    return "sqlite:///" + os.path.abspath(audit_db).lstrip("/")


def open_store(url: str, migrate: bool = True) -> Store:
    """A connection to the store at ``url``; ``migrate``: create or upgrade its schema first
    (writers do; a reader for the admin API does not need the write lock that takes)."""
    if url.startswith("sqlite:///"):
        return SQLiteStore("/" + url[len("sqlite:///") :], migrate)
    return PostgresStore(url, migrate)


class Store:
    param = "?"
    day_expr = ""

    # ------------------------------------------------------------------ writes
    def insert(self, rows: list[AuditRow]) -> None:
        raise NotImplementedError

    def prune(self, before: float) -> int:
        """Delete rows that started before ``before`` (unix seconds); returns how many."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _query(self, sql: str, args: list[Any]) -> list[tuple]:
        raise NotImplementedError

    # ------------------------------------------------------------------ reads
    def usage(
        self, since: float | None, until: float | None, group_by: str, tenant: str | None = None
    ) -> list[dict]:
        """Requests, errors and tokens per ``group_by`` value over [since, until), /admin left out."""
        key = {"tenant": "tenant", "model": "model", "version": "version", "day": self.day_expr}[group_by]
        where, args = self._where(since=since, until=until, tenant=tenant)
        # the admin API's own requests are in the trail (who looked), not in anyone's usage
        where = (where + " AND" if where else " WHERE") + f" endpoint NOT LIKE {self.param}"
        args.append("/admin%")
        sql = (
            f"SELECT {key} AS k, COUNT(*), "
            "SUM(CASE WHEN status >= 400 OR error_type IS NOT NULL THEN 1 ELSE 0 END), "
            f"SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens) FROM {TABLE}{where} "
            "GROUP BY k ORDER BY k"
        )
        out = []
        for k, n, errors, prompt, completion, cached in self._query(sql, args):
            prompt, completion = int(prompt or 0), int(completion or 0)
            out.append(
                {
                    group_by: k,
                    "requests": int(n),
                    "errors": int(errors or 0),
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "cached_tokens": int(cached or 0),
                }
            )
        return out

    def records(
        self,
        request_id: str | None = None,
        tenant: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict]:
        """Rows, newest first."""
        where, args = self._where(since=since, until=until, tenant=tenant, request_id=request_id)
        sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}{where} ORDER BY started_at DESC LIMIT {int(limit)}"
        rows = []
        for values in self._query(sql, args):
            row = dict(zip(COLUMNS, values))
            row["stream"] = bool(row["stream"])
            rows.append(row)
        return rows

    def _where(self, **filters: Any) -> tuple[str, list[Any]]:
        p = self.param
        clauses, args = [], []
        for name, value in filters.items():
            if value is None:
                continue
            if name == "since":
                clauses.append(f"started_at >= {p}")
            elif name == "until":
                clauses.append(f"started_at < {p}")
            else:
                clauses.append(f"{name} = {p}")
            args.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def _migrate_in(self, execute: Callable[..., Any], migrations: dict[int, list[str]], where: str) -> None:
        """The schema brought to SCHEMA_VERSION, inside the caller's transaction and lock;
        ``execute(sql[, args])`` returns a cursor (sqlite3's and psycopg's both do)."""
        execute(
            f"CREATE TABLE IF NOT EXISTS {VERSIONS} (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        version = _current(execute(f"SELECT version FROM {VERSIONS} WHERE component = 'audit'").fetchone())
        _check_version(version, where)
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for statement in migrations[v]:
                execute(statement)
        if version < SCHEMA_VERSION:
            execute(
                f"INSERT INTO {VERSIONS} (component, version) VALUES ('audit', {self.param}) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )

    def _insert_sql(self) -> str:
        marks = ", ".join([self.param] * len(COLUMNS))
        return (
            f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks}) ON CONFLICT (record_id) DO NOTHING"
        )


def _values(row: AuditRow) -> tuple:
    return tuple(getattr(row, c) for c in COLUMNS)


# ---------------------------------------------------------------------- SQLite

SQLITE_MIGRATIONS = {1: _schema_v1("REAL", "INTEGER")}


class SQLiteStore(Store):
    param = "?"
    day_expr = "strftime('%Y-%m-%d', started_at, 'unixepoch')"

    def __init__(self, path: str, migrate: bool = True):
        self.path = path
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.exists(path):  # the rows may hold prompts: readable by the owner alone
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("audit db %s: journal mode is %s, not WAL", path, mode)
            # WAL + NORMAL: a commit survives a process crash (the spool covers power loss)
            self.db.execute("PRAGMA synchronous = NORMAL")
            if migrate:
                self._migrate()
        except sqlite3.Error as e:
            raise StoreError(f"audit db {path}: {e}") from None

    def _migrate(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # the write lock: one process migrates, the others then see it done
        try:
            self._migrate_in(db.execute, SQLITE_MIGRATIONS, self.path)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def insert(self, rows: list[AuditRow]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(self._insert_sql(), [_values(r) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def prune(self, before: float) -> int:
        return self.db.execute(f"DELETE FROM {TABLE} WHERE started_at < ?", (before,)).rowcount

    def _query(self, sql: str, args: list[Any]) -> list[tuple]:
        return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------- PostgreSQL

POSTGRES_MIGRATIONS = {1: _schema_v1("DOUBLE PRECISION", "BOOLEAN")}


class PostgresStore(Store):
    param = "%s"
    day_expr = "to_char(to_timestamp(started_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(self, url: str, migrate: bool = True):
        import psycopg

        self.url = url
        try:
            self.db = psycopg.connect(url, connect_timeout=10, autocommit=True)
            if migrate:
                self._migrate()
        except psycopg.Error as e:
            raise StoreError(f"audit db {redact(url)}: {str(e).strip()}") from None

    def _migrate(self) -> None:
        with self.db.transaction(), self.db.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK,))
            self._migrate_in(cur.execute, POSTGRES_MIGRATIONS, redact(self.url))

    def insert(self, rows: list[AuditRow]) -> None:
        with self.db.transaction(), self.db.cursor() as cur:
            cur.executemany(self._insert_sql(), [_values(r) for r in rows])

    def prune(self, before: float) -> int:
        with self.db.transaction(), self.db.cursor() as cur:
            cur.execute(f"DELETE FROM {TABLE} WHERE started_at < %s", (before,))
            return cur.rowcount

    def _query(self, sql: str, args: list[Any]) -> list[tuple]:
        with self.db.transaction(), self.db.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def close(self) -> None:
        self.db.close()


def _current(row: tuple | None) -> int:
    return 0 if row is None else int(row[0])


def _check_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"audit db {where} has schema version {version}, newer than this zeroserve's "
            f"{SCHEMA_VERSION}: upgrade zeroserve, or point --audit-db at another database"
        )
