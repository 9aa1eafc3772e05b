"""End to end: clients hanging up free everything; admission limits give 429 at once; auth off."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_server


def gauge(server, name: str) -> float:
    status, raw = server.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def headers(server) -> dict:
    return {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}


async def open_stream(session, server, prompt: str):
    body = {"prompt": prompt, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    resp = await session.post(server.base_url + "/v1/completions", json=body, headers=headers(server))
    return resp


def test_eight_streaming_clients_hang_up_and_everything_is_freed(zeroserve_server):
    server = zeroserve_server
    wait_for(lambda: gauge(server, "zeroserve:num_requests_running") == 0, 60, "server not idle at start")
    idle_kv = gauge(server, "zeroserve:kv_cache_usage_perc")

    async def main():
        async with aiohttp.ClientSession() as session:
            responses = await asyncio.gather(
                *(open_stream(session, server, f"Tell me story {i}:") for i in range(8))
            )
            for resp in responses:
                assert resp.status == 200
                chunks = 0
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        chunks += 1
                        if chunks == 2:
                            break
            deadline = time.monotonic() + 10  # engine gauges refresh about once a second
            while gauge(server, "zeroserve:num_requests_running") == 0:
                assert time.monotonic() < deadline, "the 8 streams never showed as running"
                await asyncio.sleep(0.2)
            for resp in responses:
                resp.close()  # hang up

    asyncio.run(main())
    wait_for(
        lambda: gauge(server, "zeroserve:num_requests_running") == 0, 15, "running gauge did not return to 0"
    )
    wait_for(
        lambda: gauge(server, "zeroserve:kv_cache_usage_perc") <= idle_kv + 1e-9,
        15,
        "KV blocks were not freed",
    )


@pytest.fixture(scope="module")
def tiny_server():
    """Auth off, tiny admission limits, 2 tokenizer and 2 api processes, tcp transport with CURVE."""
    base_port = free_port_range(70)
    server = start_server(
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "1",
        "--num-kv-blocks",
        "256",
        "--num-tokenizers",
        "2",
        "--api-workers",
        "2",
        "--transport",
        "tcp",
        "--base-port",
        str(base_port),
        api_key=None,
    )
    server.base_port = base_port
    yield server
    assert server.stop() == 0, server.log()


def free_port_range(span: int) -> int:
    """A base port with `span` free ports after it (internal tcp sockets use base + 0..60)."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 60000)
        try:
            socks = []
            for offset in (0, 1, 50, 60):
                s = socket.socket()
                s.bind(("127.0.0.1", base + offset))
                socks.append(s)
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_admission_limit_gives_429_with_retry_after_at_once(tiny_server):
    server = tiny_server

    async def main():
        async with aiohttp.ClientSession() as session:
            running = await open_stream(session, server, "first")  # runs (max_num_seqs 1)
            # the second waits in the queue (its response headers only come with its first token)
            waiting = asyncio.ensure_future(open_stream(session, server, "second"))
            deadline = time.monotonic() + 30
            while gauge(server, "zeroserve:num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                await asyncio.sleep(0.2)
            started = time.monotonic()
            body = {"prompt": "third", "max_tokens": 8}
            async with session.post(server.base_url + "/v1/completions", json=body) as resp:
                status, retry, payload = resp.status, resp.headers.get("Retry-After"), await resp.json()
            refused_in = time.monotonic() - started
            running.close()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            return status, retry, payload, refused_in, None

    status, retry, payload, refused_in, waiting_status = asyncio.run(main())
    assert status == 429 and retry is not None and int(retry) >= 1
    assert set(payload["error"]) >= {"message", "type", "param", "code"}
    assert refused_in < 2.0, "a refusal must not wait for capacity"
    wait_for(
        lambda: gauge(server, "zeroserve:num_requests_running") == 0, 15, "hung-up requests still running"
    )
    # capacity is back: the same request now succeeds, without any API key (auth is off here)
    status, body = server.post("/v1/completions", {"prompt": "third", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    status, _ = server.get("/v1/models")
    assert status == 200


def test_two_tokenizers_and_two_api_processes_share_the_load(tiny_server):
    """Sequential requests (max_num_seqs is 1 here) land on both tokenizers and both api processes."""
    texts = set()
    for i in range(6):
        status, body = tiny_server.post(
            "/v1/completions", {"prompt": f"Number {i}:", "max_tokens": 3, "temperature": 0}
        )
        assert status == 200, body
        texts.add(body["choices"][0]["text"])
    assert len(texts) > 1
    procs = tiny_server.children()
    names = []
    for pid in procs:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
        names.append(parts[parts.index(b"proc") + 1])
    assert names.count(b"tokenizer") == 2 and names.count(b"api") == 2


def test_tcp_transport_refuses_peers_without_the_curve_key(tiny_server):
    """Internal sockets on tcp require CURVE: a plain peer, or one with a key of its own, gets nothing."""
    import msgspec
    import zmq

    from zeroserve.shared.messages import Ping

    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.DEALER)
        plain.connect(f"tcp://127.0.0.1:{tiny_server.base_port}")
        stranger = ctx.socket(zmq.DEALER)
        server_public, _ = zmq.curve_keypair()  # not the server's key
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.curve_serverkey = server_public
        stranger.connect(f"tcp://127.0.0.1:{tiny_server.base_port}")
        for sock in (plain, stranger):
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.send(msgspec.msgpack.encode(Ping(sent_at=0.0, request_id="probe")), zmq.NOBLOCK)
            except zmq.Again:
                continue  # not even connected: refused
            assert sock.poll(2000) == 0, "an unauthenticated peer got an answer"
    finally:
        ctx.destroy(0)
    status, _ = tiny_server.get("/ready")
    assert status == 200
