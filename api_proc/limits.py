"""Per-tenant limits: requests per minute and tokens per minute, checked before admission.

Each limit is a token bucket holding up to one minute's allowance and refilling continuously
(a tenant idle for a minute may burst its whole minute at once, then gets the steady rate).
They apply to the endpoints that run the model (POST /v1/completions, /v1/chat/completions,
/v1/embeddings, and TGI's routes).

Tokens are not known until a request ends, so a request is charged an estimate when it is
admitted and corrected when it ends (LiteLLM and most gateways do the same):

    estimate = ceil(body bytes / 4)                       the prompt, at ~4 bytes a token
             + max_tokens (or max_completion_tokens) x n  when the body gives it, else 0
    at the end: the bucket is charged prompt_tokens + completion_tokens (the response's usage)
                instead (a refund when the estimate was high, a debt when it was low)

A request is admitted when each bucket holds its cost (a cost above the whole minute needs a
full bucket), else it is refused with 429 and ``Retry-After`` (the seconds until the bucket
refills enough). A debt (usage above the estimate) makes the tenant's next requests wait.

Limits are kept by each api process in its own memory. With ``--api-workers N`` each process
enforces 1/N of every limit, so the N together never admit more than the limit; connections
are spread over the processes by the kernel, so a tenant with few connections may be refused
somewhat before reaching the full limit.
"""

from __future__ import annotations

import math
import time

import msgspec
from aiohttp import web

from zeroserve.api_proc.auth import Tenant
from zeroserve.api_proc.errors import ApiError

# TGI's routes too (tgi.py): their max_new_tokens is not read here, the usage settles the charge
GENERATION_PATHS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/generate", "/generate_stream", "/"}
)
BYTES_PER_TOKEN = 4


class _Sizes(msgspec.Struct):
    """The fields of a generation body the estimate reads; anything else is ignored."""

    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None


_decode_sizes = msgspec.json.Decoder(_Sizes).decode


class Bucket:
    def __init__(self, per_minute: float, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # per second
        self.level = self.capacity
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self, cost: float) -> float:
        """Seconds until the bucket holds ``cost`` (capped at a full bucket); 0: now."""
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class TenantLimits:
    def __init__(self, tenants: list[Tenant], share: float = 1.0, max_body_bytes: int = 4 << 20):
        self.limited = {t.name: t for t in tenants if t.requests_per_minute or t.tokens_per_minute}
        self.share = share
        self.max_body_bytes = max_body_bytes
        self.rpm: dict[str, Bucket] = {}
        self.tpm: dict[str, Bucket] = {}
        now = time.monotonic()
        for t in self.limited.values():
            if t.requests_per_minute:
                self.rpm[t.name] = Bucket(t.requests_per_minute * share, now)
            if t.tokens_per_minute:
                self.tpm[t.name] = Bucket(t.tokens_per_minute * share, now)

    def __bool__(self) -> bool:
        return bool(self.limited)

    def applies(self, tenant: Tenant, request: web.Request) -> bool:
        return tenant.name in self.limited and request.method == "POST" and request.path in GENERATION_PATHS

    async def estimate(self, request: web.Request) -> int:
        """The token estimate of a generation request (the module docstring's rule)."""
        size = request.content_length
        if size is None or size > self.max_body_bytes:
            return 0  # chunked or too large: the handler answers it; usage corrects the charge
        raw = await request.read()  # aiohttp keeps it: the handler reads the same bytes
        estimate = math.ceil(len(raw) / BYTES_PER_TOKEN)
        try:
            sizes = _decode_sizes(raw)
        except (msgspec.DecodeError, RecursionError):
            return estimate  # the handler answers 400
        out = sizes.max_tokens if sizes.max_tokens is not None else sizes.max_completion_tokens
        if out is not None and out > 0:
            estimate += out * max(1, sizes.n or 1)
        return estimate

    async def admit(self, tenant: Tenant, request: web.Request) -> int:
        """Charge the tenant for this request, or raise 429; returns the tokens charged."""
        tokens = await self.estimate(request) if tenant.name in self.tpm else 0
        now = time.monotonic()
        rpm, tpm = self.rpm.get(tenant.name), self.tpm.get(tenant.name)
        waits = []
        if rpm is not None:
            rpm.refill(now)
            waits.append((rpm.wait_s(1), "requests", tenant.requests_per_minute))
        if tpm is not None:
            tpm.refill(now)
            waits.append((tpm.wait_s(tokens), "tokens", tenant.tokens_per_minute))
        wait, what, limit = max(waits)
        if wait > 0:
            per_process = "" if self.share == 1.0 else f" ({self.share:.3g} of it in each api process)"
            raise ApiError(
                429,
                f"Tenant {tenant.name!r} is over its limit of {limit} {what} per minute{per_process}; "
                f"retry after {math.ceil(wait)} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if rpm is not None:
            rpm.level -= 1
        if tpm is not None:
            tpm.level -= tokens
        return tokens

    def settle(self, tenant: Tenant, charged: int, ctx) -> None:
        """At the request's end: charge its real usage instead of the estimate."""
        tpm = self.tpm.get(tenant.name)
        if tpm is None or ctx is None:
            return
        tpm.refill(time.monotonic())
        tpm.level = min(tpm.capacity, tpm.level + charged - (ctx.prompt_tokens + ctx.completion_tokens))
