"""One audit row: what a finished request leaves in the trail, as the spool and the store hold it.

A row is made from the request-end seam's ``RequestRecord`` on the writer thread (hashing and
ids cost nothing on the event loop). ``record_id`` is random and unique: it is the store's
primary key, so replaying a spool inserts each row once (``ON CONFLICT DO NOTHING``) even when
the database had already taken it; ``request_id`` is the client-visible id, not unique (a
client may send the same ``X-Request-Id`` twice).

Content (``--audit-content``): ``none`` keeps no text; ``hash`` keeps the SHA-256 (hex) of the
prompt and of the output text; ``full`` keeps both texts and their hashes.
"""

from __future__ import annotations

import hashlib
import uuid

import msgspec

CONTENT_MODES = ("none", "hash", "full")
SOURCES = ("http", "batch")


class AuditRow(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    # append new fields at the end with defaults: spools written by an older version still decode
    record_id: str
    request_id: str
    started_at: float  # unix seconds (UTC) at arrival
    source: str  # http | batch
    tenant: str | None
    client: str
    endpoint: str
    method: str
    model: str | None
    version: str | None
    replica: str | None  # the replica id ("r0")
    stream: bool
    status: int  # HTTP status sent; 499: the client left first
    error_type: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float | None
    e2e_s: float
    prompt_sha256: str | None = None
    output_sha256: str | None = None
    prompt_text: str | None = None
    output_text: str | None = None


COLUMNS = tuple(f.name for f in msgspec.structs.fields(AuditRow))


def _sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def row_from(record, content: str, source: str = "http") -> AuditRow:
    """The row of a request_log.RequestRecord under the content mode ``content``."""
    keep_hash = content in ("hash", "full")
    keep_text = content == "full"
    return AuditRow(
        record_id=uuid.uuid4().hex,
        request_id=record.request_id,
        started_at=record.started_at,
        source=source,
        tenant=record.tenant,
        client=record.client,
        endpoint=record.endpoint,
        method=record.method,
        model=record.model,
        version=record.version,
        replica=record.replica,
        stream=record.stream,
        status=record.status,
        error_type=record.error_type,
        finish_reason=record.finish_reason,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
        ttft_s=record.ttft_s,
        e2e_s=record.e2e_s,
        prompt_sha256=_sha256(record.prompt_text) if keep_hash else None,
        output_sha256=_sha256(record.output_text) if keep_hash else None,
        prompt_text=record.prompt_text if keep_text else None,
        output_text=record.output_text if keep_text else None,
    )


def row_dict(row: AuditRow) -> dict:
    return {name: getattr(row, name) for name in COLUMNS}
