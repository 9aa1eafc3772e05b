"""The audit trail: one record per request, spooled to local disk, stored in SQLite or PostgreSQL.

    request_log (the request-end seam) ── RequestRecord ──▶ ApiAudit.sink ──▶ AuditWriter (writer.py)
                                                                               spool.py (fsync) ─▶ store.py
    /admin/usage, /admin/audit (admin.py) ──▶ ApiAudit.query ─ a reader connection on a thread ─▶ store.py

A response's last bytes leave only after its record is fsynced in the spool (a group commit,
~1-3 ms; never a wait for the database): a client that has its whole answer can count on the
record surviving a kill -9 of the api process (hold.py: how, for whole answers and streams).

What is recorded: every request to the HTTP API except the probes and scrapes (/health, /ready,
/metrics, /dashboard), and every line ``zeroserve batch`` runs (source ``batch``). Programs that
use the ZMQ client (``zeroserve.shared.client``) directly talk to the tokenizers, not the API:
no audit record is made for them (docs/audit.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from zeroserve.api_proc.audit.hold import defer_stream_end, stream_hold_middleware
from zeroserve.api_proc.audit.spool import Spool
from zeroserve.api_proc.audit.store import Store, StoreError, open_store, redact, resolve_url
from zeroserve.api_proc.audit.writer import AuditWriter

log = logging.getLogger("zeroserve.audit")

SPOOL_DIR = "audit-spool"
QUERY_WAIT_S = 2.0  # an admin query first waits this long for this process's records to be stored

__all__ = ["ApiAudit", "StoreError", "audit_writer", "resolve_url"]


def audit_writer(
    audit_db: str,
    state_dir: str,
    spool_name: str,
    content: str = "none",
    retention_days: float = 0.0,
    source: str = "http",
    on_dropped: Callable[[int], None] | None = None,
) -> AuditWriter | None:
    """The writer of ``--audit-db`` (None when it is ``off``), spooling in STATE_DIR/audit-spool."""
    url = resolve_url(audit_db, state_dir)
    if url is None:
        return None
    spool = Spool(os.path.join(state_dir, SPOOL_DIR), spool_name, store=url)
    return AuditWriter(url, spool, content, retention_days, source, on_dropped)


class ApiAudit:
    """An api process's audit trail: its sink, its response barrier and its queries."""

    def __init__(self, writer: AuditWriter):
        self.writer = writer
        self.url = writer.url
        # streams recorded before their last bytes (hold.py): the seam's later record is skipped
        self.early: set[tuple[str, float]] = set()

    def sink(self, record) -> None:
        key = (record.request_id, record.started_at)
        if key in self.early:
            self.early.discard(key)
            return
        self.writer.submit(record)

    async def record_now(self, request: web.Request, status: int) -> None:
        """A stream's record, before its last bytes go out: handed in, then on disk."""
        from zeroserve.api_proc.request_log import context_of

        ctx = context_of(request)
        if ctx is not None:
            record = ctx.record(status)
            self.early.add((record.request_id, record.started_at))
            self.writer.submit(record)
        await self.writer.sync()

    async def query(self, fn: Callable[[Store], Any]) -> Any:
        """``fn(store)`` on a reader connection, off the event loop, after this process's records
        are stored (or QUERY_WAIT_S passed: the database is slow or away)."""
        from zeroserve.api_proc.errors import ApiError

        await self.writer.stored(QUERY_WAIT_S)

        # the writer could not open the store yet: a fresh database may lack the schema, make it
        migrate = not self.writer.schema_ready

        def run() -> Any:
            store = open_store(self.url, migrate=migrate)
            try:
                return fn(store)
            finally:
                store.close()

        try:
            return await asyncio.to_thread(run)
        except Exception as e:
            why = str(e) if isinstance(e, StoreError) else f"{type(e).__name__}: {e}"
            log.warning("audit query on %s failed: %s", redact(self.url), why)
            raise ApiError(
                503, "The audit database is unavailable; retry shortly.", code="audit_unavailable"
            ) from None

    async def _ctx(self, app: web.Application):
        self.writer.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.writer.close)

    def install(self, app: web.Application, recorded: Callable[[web.Request], bool]) -> None:
        """Start and stop with the app; hold each non-streaming answer until its record is on disk.
        ``recorded(request)``: whether the request gets a record (probes do not)."""

        async def hold_until_spooled(request: web.Request, response: web.StreamResponse) -> None:
            if isinstance(response, web.Response):
                if recorded(request):
                    await self.writer.sync()
            else:
                defer_stream_end(request, response)

        app.cleanup_ctx.append(self._ctx)
        app.on_response_prepare.append(hold_until_spooled)
        app.middlewares.append(stream_hold_middleware(self.record_now))  # innermost


def setup_accounting(app: web.Application, state: Any, tenants: Any) -> ApiAudit | None:
    """What issue 21 adds to an api process: per-tenant metrics, the audit trail (unless
    ``audit_store`` is None) and the admin API (with an admin key)."""
    from zeroserve.api_proc.admin import AUDIT, setup_admin
    from zeroserve.api_proc.request_log import UNRECORDED_PREFIXES

    config = state.config
    metrics = state.metrics
    if tenants:
        names = frozenset(tenants.names)  # the label values: the configured tenants alone

        def tenant_metrics(record) -> None:
            if record.tenant in names:
                metrics.tenant_finished(record.tenant, record.prompt_tokens, record.completion_tokens)

        state.request_sinks.append(tenant_metrics)
    audit = None
    if config.audit_store is not None:
        writer = audit_writer(  # audit_store is resolved already: resolve_url keeps it as it is
            config.audit_store,
            config.state_dir,
            f"api-{config.index}",
            config.audit_content,
            config.audit_retention_days,
            "http",
            on_dropped=metrics.audit_dropped,
        )
        assert writer is not None
        audit = ApiAudit(writer)
        state.request_sinks.append(audit.sink)
        state.wants_text = state.wants_text or config.audit_content != "none"
        app[AUDIT] = audit
        audit.install(app, lambda request: not request.path.startswith(UNRECORDED_PREFIXES))
    setup_admin(app, config.admin_key)
    return audit
