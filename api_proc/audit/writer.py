"""The audit writer: records in on the event loop, spooled on one thread, stored by another.

    event loop                      spool thread                          store thread
    sink(record) ─ deque.append ──▶ take every waiting record ─▶ rows     every 100 ms (or 256 KiB):
      (microseconds, no I/O)        (ids, hashes); spool.append + fsync   store.insert(rows in spool)
                                    ──▶ durable: sync() waiters wake      ──▶ in the database: spool cut back
                                                                          on failure: keep them spooled,
                                                                          retry (1 s doubling to 30 s)

The spool thread takes whatever has queued while it was busy, so fsyncs group themselves: one
per batch, however many requests ended meanwhile (a group commit; nothing waits on a timer).
The database has a thread of its own, so a slow or hung one (a connect timing out, an insert
stuck behind a lock) never delays an fsync; the two share the spool under a lock, held for
file operations only. The request path awaits ``sync()`` only where a response's last bytes
must not leave before its record is on disk (api_proc/audit/__init__.py); it never waits for
the database.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

import msgspec

from zeroserve.api_proc.audit.record import AuditRow, row_from
from zeroserve.api_proc.audit.spool import Spool
from zeroserve.api_proc.audit.store import Store, StoreError, open_store, redact

log = logging.getLogger("zeroserve.audit")

BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0
PRUNE_EVERY_S = 3600.0
DROP_LOG_EVERY_S = 10.0
SYNC_TIMEOUT_S = 5.0  # a response waits at most this long for its record's fsync (a stuck disk)
# the database gets the spooled rows in batches: at most this long after they are spooled, or
# once this many bytes wait (a transaction per batch, not per fsync)
STORE_EVERY_S = 0.1
STORE_BATCH_BYTES = 256 << 10


class AuditWriter:
    def __init__(
        self,
        url: str,
        spool: Spool,
        content: str = "none",
        retention_days: float = 0.0,
        source: str = "http",
        on_dropped: Callable[[int], None] | None = None,
    ):
        self.url = url
        self.spool = spool
        self.content = content
        self.retention_s = retention_days * 86400.0
        self.source = source
        self.on_dropped = on_dropped
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()  # records queued, or stopping: the spool thread
        self._store_wake = threading.Event()  # rows spooled, or the spool thread done: the store thread
        self._lock = threading.Lock()  # the spool's file and offsets, shared by the two threads
        self._spool_done = False
        self._store_thread: threading.Thread | None = None
        self._submitted = 0  # event loop: records handed in
        self._durable = 0  # writer thread: records fsynced in the spool (or dropped)
        self._stored = 0  # writer thread: records in the database
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dropped = 0
        self._dropped_unlogged = 0
        self._drop_logged_at = 0.0
        self._sync_timeouts = 0
        self._since = 0.0  # when the oldest sync() waiter began (or the last release)
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_store = 0.0  # monotonic time of the last write to the database
        self.store_error: str | None = None  # the last failure, while the database is out of reach
        self.schema_ready = False  # the writer has opened the store once (its schema exists)
        self._first_open_done = False  # the thread's first try to open the store is over (either way)

    # ------------------------------------------------------------------ event loop side

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        waiting = self.spool.open()
        if waiting:
            log.info("audit: %d record(s) spooled by an earlier run go to the database now", waiting)
        self._thread = threading.Thread(target=self._spool_loop, name="audit-spool", daemon=True)
        self._store_thread = threading.Thread(target=self._store_loop, name="audit-store", daemon=True)
        self._thread.start()
        self._store_thread.start()
        self._watchdog = self._loop.call_later(1.0, self._watch)

    def submit(self, record) -> None:
        """A request_log.RequestRecord; returns at once (the thread does the rest)."""
        self._queue.append(record)
        self._submitted += 1
        self._wake.set()

    async def sync(self) -> None:
        """Until every record submitted so far is fsynced in the spool (or dropped).

        The requests that end between two fsyncs share one future: per request this is a list
        lookup, not a timer (a watchdog, ``_watch``, frees waiters of a stuck disk)."""
        target = self._submitted
        if self._durable >= target or self._thread is None:
            return
        if self._waiters and self._waiters[-1][0] == target:
            future = self._waiters[-1][1]
        else:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((target, future))
            if len(self._waiters) == 1:
                self._since = time.monotonic()
        await asyncio.shield(future)

    async def stored(self, timeout: float = 2.0) -> bool:
        """Until every record submitted so far is in the database (and the writer has tried to
        open it once: a reader then finds its schema); False after ``timeout``."""
        target = self._submitted
        deadline = time.monotonic() + timeout
        while self._stored < target or not self._first_open_done:
            thread = self._store_thread
            if time.monotonic() >= deadline or thread is None or not thread.is_alive():
                return False
            await asyncio.sleep(0.005)
        return True

    def _release(self, everyone: bool = False) -> None:
        durable = self._durable
        while self._waiters and (everyone or self._waiters[0][0] <= durable):
            _, future = self._waiters.pop(0)
            if not future.done():
                future.set_result(None)
        self._since = time.monotonic()

    def _watch(self) -> None:
        """Every second on the loop: responses held past SYNC_TIMEOUT_S (a stuck disk, a dead
        writer) go out, with an ERROR."""
        if self._waiters and time.monotonic() - self._since > SYNC_TIMEOUT_S:
            self._sync_timeouts += 1
            log.error(
                "audit: records were not on disk after %.0f s (%d time(s)); their responses went out "
                "anyway. Is the disk of %s stuck?",
                SYNC_TIMEOUT_S,
                self._sync_timeouts,
                self.spool.path,
            )
            self._release(everyone=True)
        if self._thread is not None and self._loop is not None:
            self._watchdog = self._loop.call_later(1.0, self._watch)

    def close(self, timeout: float = 10.0) -> None:
        """Spool and store what is queued, then stop; what the database did not take stays in the
        spool for the next start."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        if self._store_thread is not None:
            self._store_thread.join(max(0.0, deadline - time.monotonic()))
            if self._store_thread.is_alive():
                log.warning(
                    "audit: the database did not answer in %.0f s at shutdown; the spool keeps the rest",
                    timeout,
                )
        self._thread = self._store_thread = None

    # ------------------------------------------------------------------ writer thread

    def _spool_loop(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        taken = 0
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            stopping = self._stopping
            records = []
            while self._queue:
                records.append(self._queue.popleft())
            if records:
                with self._lock:
                    self._spool(records, encoder)
                    taken += len(records)
                    self._durable = taken
                if self._loop is not None and not self._loop.is_closed():
                    try:
                        self._loop.call_soon_threadsafe(self._release)
                    except RuntimeError:  # the loop closed meanwhile
                        pass
                self._store_wake.set()
            self._log_drops(time.monotonic(), force=stopping)
            if stopping and not self._queue:
                break
        self._spool_done = True
        self._store_wake.set()

    def _store_loop(self) -> None:
        decoder = msgspec.msgpack.Decoder(AuditRow)
        store: Store | None = None
        retry_at, backoff, next_prune = 0.0, BACKOFF_START_S, 0.0
        try:  # at once, not at the first record: the schema exists from the start (admin queries)
            store = self._connect()
        except Exception as e:
            store = self._failed(store, e, backoff)
            retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._first_open_done = True
        while True:
            self._store_wake.wait(STORE_EVERY_S if self.spool.pending_bytes else 1.0)
            self._store_wake.clear()
            stopping = self._spool_done  # everything handed in is spooled: one last write, then stop
            now = time.monotonic()
            due = now - self._last_store >= STORE_EVERY_S or self.spool.pending_bytes >= STORE_BATCH_BYTES
            if self.spool.pending_bytes and ((due and now >= retry_at) or stopping):
                self._last_store = now
                try:
                    store = store or self._connect()
                    self._drain(store, decoder)
                    backoff = BACKOFF_START_S
                except Exception as e:
                    store = self._failed(store, e, backoff)
                    retry_at, backoff = now + backoff, min(backoff * 2, BACKOFF_MAX_S)
            with self._lock:
                if not self.spool.pending_bytes:
                    self._stored = self._durable
            if self.retention_s > 0 and now >= next_prune and now >= retry_at:
                next_prune = now + PRUNE_EVERY_S
                try:
                    store = store or self._connect()
                    pruned = store.prune(time.time() - self.retention_s)
                    if pruned:
                        log.info("audit: removed %d record(s) past the retention period", pruned)
                except Exception as e:
                    store = self._failed(store, e, backoff)
            if stopping:
                break
        if store is not None:
            store.close()
        with self._lock:
            self.spool.close()

    def _spool(self, records: list, encoder: msgspec.msgpack.Encoder) -> None:
        rows = records
        try:
            rows = [row_from(r, self.content, self.source) for r in records]
            ok = self.spool.append([encoder.encode(row) for row in rows])
        except OSError as e:
            log.error("audit: cannot write the spool %s: %s", self.spool.path, e)
            ok = False
        except Exception:  # a record this code cannot turn into a row: counted, never a dead writer
            log.exception("audit: cannot make audit rows of %d record(s)", len(records))
            ok = False
        if not ok:
            self.dropped += len(rows)
            self._dropped_unlogged += len(rows)
            if self.on_dropped is not None:
                self.on_dropped(len(rows))

    def _log_drops(self, now: float, force: bool = False) -> None:
        if self._dropped_unlogged and (force or now - self._drop_logged_at >= DROP_LOG_EVERY_S):
            log.error(
                "audit: the spool %s is full (%d bytes wait for the database, limit %d): dropped %d "
                "record(s), %d since start",
                self.spool.path,
                self.spool.pending_bytes,
                self.spool.max_bytes,
                self._dropped_unlogged,
                self.dropped,
            )
            self._dropped_unlogged = 0
            self._drop_logged_at = now

    def _connect(self) -> Store:
        store = open_store(self.url)
        self.schema_ready = True
        if self.store_error is not None:
            log.warning("audit: the database %s is back; writing the spooled records", redact(self.url))
            self.store_error = None
        return store

    def _drain(self, store: Store, decoder: msgspec.msgpack.Decoder) -> None:
        while True:
            with self._lock:  # the file only; the database is written without it
                if not self.spool.pending_bytes:
                    return
                frames, offset = self.spool.read_pending()
            if offset == self.spool.committed:  # no whole frame: damage on disk, not a torn tail
                raise StoreError(f"the spool {self.spool.path} is damaged at byte {offset}; move it aside")
            rows = []
            for payload in frames:
                try:
                    rows.append(decoder.decode(payload))
                except msgspec.DecodeError:  # a frame whose CRC held but that is not a row: unusable
                    log.error("audit: skipped an undecodable record in %s", self.spool.path)
            if rows:
                store.insert(rows)
            with self._lock:
                self.spool.commit(offset)

    def _failed(self, store: Store | None, error: Exception, backoff: float) -> None:
        why = str(error) if isinstance(error, StoreError) else f"{type(error).__name__}: {error}"
        if store is not None:
            try:
                store.close()
            except Exception:
                pass
        first = self.store_error is None
        self.store_error = why
        (log.warning if first else log.info)(
            "audit: the database %s is out of reach (%s); %d bytes of records wait in the spool %s, "
            "retrying in %.3g s",
            redact(self.url),
            why,
            self.spool.pending_bytes,
            self.spool.path,
            backoff,
        )
        return None
