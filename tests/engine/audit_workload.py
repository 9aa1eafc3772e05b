"""A mixed workload for the audit trail's full-stack tests, and the checks of its records.

Each request carries its own X-Request-Id, so its record can be found; what the client saw
(status, usage) is kept next to it. Kinds, in turn: a completion, a streamed chat completion
with usage, n = 2, a bad request (400), and, for tenants that do it, a stream the client
drops after its first chunk.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import aiohttp

MARKER = "zqxaudited"  # in every prompt: with --audit-content none it must be nowhere on disk
KINDS = ("completion", "chat_stream", "n2", "bad", "disconnect")


@dataclass
class Outcome:
    request_id: str
    tenant: str
    kind: str
    status: int = 0
    usage: dict | None = None  # the response's usage (None: the client did not get one)
    complete: bool = False  # the whole response reached the client


def body_of(kind: str, i: int) -> tuple[str, dict]:
    prompt = f"{MARKER} {i}: name a colour"
    if kind == "completion":
        return "/v1/completions", {"prompt": prompt, "max_tokens": 1 + i % 4, "temperature": 0}
    if kind == "chat_stream":
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1 + i % 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    if kind == "n2":
        return "/v1/completions", {"prompt": prompt, "max_tokens": 2, "n": 2, "temperature": 0.7, "seed": i}
    if kind == "bad":
        return "/v1/completions", {"prompt": prompt, "temperature": "hot"}
    return "/v1/completions", {"prompt": prompt, "max_tokens": 64, "ignore_eos": True, "stream": True}


async def one(session: aiohttp.ClientSession, base_url: str, key: str, out: Outcome, i: int) -> None:
    path, body = body_of(out.kind, i)
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": out.request_id}
    async with session.post(base_url + path, json=body, headers=headers) as resp:
        out.status = resp.status
        if out.kind == "disconnect":
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    break
            resp.close()  # gone after the first chunk
            return
        if body.get("stream") and resp.status == 200:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[len(b"data: ") :])
                    if chunk.get("usage"):
                        out.usage = chunk["usage"]
            out.complete = True
            return
        payload = await resp.json()
        out.usage = payload.get("usage")
        out.complete = True


async def run_mix(
    base_url: str,
    keys: dict[str, str],
    total: int,
    concurrency: int = 16,
    disconnecting: tuple[str, ...] = (),
) -> list[Outcome]:
    """``total`` requests spread over the tenants of ``keys`` (name -> key), ``concurrency`` at a time."""
    names = sorted(keys)
    outcomes = []
    for i in range(total):
        tenant = names[i % len(names)]
        kinds = KINDS if tenant in disconnecting else KINDS[:-1]
        outcomes.append(
            Outcome(f"audit-{uuid.uuid4().hex[:12]}-{i}", tenant, kinds[(i // len(names)) % len(kinds)])
        )
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=300)

    async def run(i: int, out: Outcome) -> None:
        async with gate:
            await one(session, base_url, keys[out.tenant], out, i)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(run(i, o) for i, o in enumerate(outcomes)))
    return outcomes


def check_records(outcomes: list[Outcome], rows: list[dict]) -> None:
    """One record per request, under its tenant, with the status and usage the client saw."""
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    for out in outcomes:
        found = by_id.get(out.request_id, [])
        assert len(found) == 1, f"{out}: {len(found)} records"
        (row,) = found
        assert row["tenant"] == out.tenant, (out, row)
        if out.kind == "disconnect":  # no usage to compare: the record says the client left, and when
            assert row["error_type"] == "client_disconnected" and row["status"] in (200, 499), (out, row)
            assert row["finish_reason"] == "abort" and row["completion_tokens"] < 64, (out, row)
            continue
        assert row["status"] == out.status, (out, row)
        if out.kind == "bad":
            assert out.status == 400 and row["completion_tokens"] == 0 and row["error_type"], (out, row)
            continue
        assert out.status == 200 and out.usage is not None, out
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            out.usage["prompt_tokens"],
            out.usage["completion_tokens"],
        ), (out, row)
        assert row["stream"] == (out.kind == "chat_stream"), (out, row)


def expected_usage(outcomes: list[Outcome], tenant: str) -> dict:
    mine = [o for o in outcomes if o.tenant == tenant]
    return {
        "requests": len(mine),
        "prompt_tokens": sum(o.usage["prompt_tokens"] for o in mine if o.usage),
        "completion_tokens": sum(o.usage["completion_tokens"] for o in mine if o.usage),
    }
