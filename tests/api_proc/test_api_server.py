"""The production runner (server.py): SO_REUSEPORT, handler cancellation on disconnect, and a
graceful SIGTERM, on real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import aiohttp
from api_fake_engine import FakeEngineClient, make_config

from zeroserve.api_proc.app import create_app
from zeroserve.api_proc.server import serve_app

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_two_api_processes_share_a_port():
    port = free_port()
    fakes = [FakeEngineClient(), FakeEngineClient()]
    runners = [await serve_app(create_app(make_config(port=port), f), make_config(port=port)) for f in fakes]
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(16):  # fresh connections; the kernel spreads them over both listeners
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"prompt": "x", "max_tokens": 1},
                    headers={"Connection": "close"},
                ) as resp:
                    assert resp.status == 200
        assert sum(len(f.requests) for f in fakes) == 16
        assert all(f.requests for f in fakes)  # both listeners took connections
    finally:
        for r in runners:
            await r.cleanup()


async def test_disconnect_cancels_a_non_streaming_handler():
    port = free_port()
    fake = FakeEngineClient()
    runner = await serve_app(create_app(make_config(port=port), fake), make_config(port=port))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"prompt": "HANG", "max_tokens": 10}).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await asyncio.wait_for(fake.started.wait(), 5)
        writer.close()
        for _ in range(100):
            if fake.aborted:
                break
            await asyncio.sleep(0.02)
        assert fake.aborted == [fake.requests[0].request_id] and fake.active == 0
    finally:
        await runner.cleanup()


SERVE = textwrap.dedent("""
    import sys
    from api_fake_engine import FakeEngineClient, make_config
    from zeroserve.api_proc.server import ApiProcess
    from zeroserve.shared.proc_main import run_actor
    config = make_config(port=int(sys.argv[1]), shutdown_timeout_s=10.0)
    run_actor("api", lambda: ApiProcess(config, client=FakeEngineClient()))
""")


def test_sigterm_drains_in_flight_requests_then_exits_0():
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "ZEROSERVE_NO_PDEATHSIG": "1",
    }
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], env=env, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the api process did not start"
                time.sleep(0.1)

        async def slow_request_across_sigterm() -> dict:
            async with aiohttp.ClientSession() as session:
                request = asyncio.ensure_future(
                    session.post(base + "/v1/completions", json={"prompt": "SLOW", "max_tokens": 25})
                )
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                async with await request as resp:
                    assert resp.status == 200
                    return await resp.json()

        body = asyncio.run(slow_request_across_sigterm())
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 25
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
