"""A version swap under load: 64 concurrent streams while v2 is hot-loaded, traffic is shifted
0 -> 100% to it and v1 is unloaded. Reports errors (target 0) and TTFT p50/p99 in three phases:
before the swap, during it (from the load to v1's unload), and after.

Starts ``zeroserve serve`` (the packaged SmolLM2 as v1) with its own run and state dirs, then
drives the registry through the launcher's control socket (the same AdminCommand the api's
/admin routes forward), so it needs no admin key:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_model_swap.py \\
        [--streams 64] [--max-tokens 64] [--steps 10,50,100] [--step-s 5] [--json OUT]

Each client loops: one streaming completion at a time, recording TTFT (first text chunk),
status, X-Model-Version and whether the stream ended with a finish_reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp
import msgspec
import zmq
import zmq.asyncio
from bench_peers import stop, wait_ready  # this folder: the one way the benchmarks start and stop servers

from zeroserve.shared.control import AdminCommand, ToApi


class Control:
    def __init__(self, run_dir: str, model: str):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{run_dir}/control.sock")
        self.model = model

    async def call(self, op: str, version: str | None = None, body: dict | None = None) -> tuple[int, dict]:
        cmd = AdminCommand(uuid.uuid4().hex, op, self.model, version, json.dumps(body) if body else "")
        await self.sock.send(msgspec.msgpack.encode(cmd))
        reply = msgspec.msgpack.decode(await asyncio.wait_for(self.sock.recv(), 60), type=ToApi)
        return reply.status, json.loads(reply.body)

    async def state(self, version: str) -> str:
        _, out = await self.call("list")
        for v in out["data"][0]["versions"]:
            if v["version"] == version:
                return v["state"]
        return "absent"

    async def wait(self, version: str, state: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if await self.state(version) == state:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{version} not {state} after {timeout}s")


async def client(session, url: str, args, results: list, stop_at: list[float]) -> None:
    body = {"prompt": "Write a short poem about the sea.", "max_tokens": args.max_tokens, "stream": True}
    while time.monotonic() < stop_at[0]:
        started = time.monotonic()
        ttft, finish, status, version = None, None, 0, None
        try:
            async with session.post(url + "/v1/completions", json=body) as r:
                status, version = r.status, r.headers.get("X-Model-Version")
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        if ttft is None and choice.get("text"):
                            ttft = time.monotonic() - started
                        finish = choice.get("finish_reason") or finish
        except (TimeoutError, aiohttp.ClientError) as e:
            status = f"{type(e).__name__}"
        ok = status == 200 and finish is not None
        results.append(
            {"start": started, "end": time.monotonic(), "ttft": ttft, "ok": ok, "version": version}
        )


def quantile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def summary(results: list[dict], start: float, end: float) -> dict:
    phase = [r for r in results if start <= r["start"] < end]
    ttfts = [r["ttft"] for r in phase if r["ttft"] is not None]
    versions: dict[str, int] = {}
    for r in phase:
        versions[str(r["version"])] = versions.get(str(r["version"]), 0) + 1
    return {
        "requests": len(phase),
        "errors": sum(not r["ok"] for r in phase),
        "ttft_p50_s": quantile(ttfts, 0.5),
        "ttft_p99_s": quantile(ttfts, 0.99),
        "versions": versions,
    }


async def run(args, url: str, run_dir: str) -> dict:
    control = Control(run_dir, args.model_name)
    results: list[dict] = []
    stop_at = [float("inf")]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [
            asyncio.create_task(client(session, url, args, results, stop_at)) for _ in range(args.streams)
        ]
        await asyncio.sleep(args.warmup_s)
        before = time.monotonic()
        await asyncio.sleep(args.phase_s)
        swap = time.monotonic()
        status, out = await control.call("load", body={"version": "v2", "weight": 0})
        assert status == 202, out
        await control.wait("v2", "ready", 600)
        loaded = time.monotonic()
        for pct in args.steps:
            status, out = await control.call("traffic", body={"weights": {"v1": 100 - pct, "v2": pct}})
            assert status == 200, out
            await asyncio.sleep(args.step_s)
        status, out = await control.call("unload", "v1")
        assert status == 202, out
        await control.wait("v1", "unloaded", 300)
        swapped = time.monotonic()
        await asyncio.sleep(args.phase_s)
        stop_at[0] = time.monotonic()
        await asyncio.gather(*tasks)
    return {
        "streams": args.streams,
        "load_s": round(loaded - swap, 2),
        "swap_s": round(swapped - swap, 2),
        "before": summary(results, before, swap),
        "during": summary(results, swap, swapped),
        "after": summary(results, swapped, stop_at[0]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", default="10,50,100", help="v2's traffic percentages, in order")
    p.add_argument("--step-s", type=float, default=5.0)
    p.add_argument("--phase-s", type=float, default=15.0, help="seconds measured before and after the swap")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--port", type=int, default=8917)
    p.add_argument("--model-name", default="smol")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("serve_args", nargs="*", help="extra `zeroserve serve` flags (after --)")
    args = p.parse_args()
    args.steps = [int(x) for x in args.steps.split(",")]
    work = tempfile.mkdtemp(prefix="bench-swap-")
    run_dir = os.path.join(work, "run")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "zeroserve"), "serve", "--port", str(args.port),
        "--run-dir", run_dir, "--state-dir", os.path.join(work, "state"), "--audit-db", "off",
        "--served-model-name", args.model_name, "--max-num-seqs", str(max(64, args.streams)), *args.serve_args,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    log = open(os.path.join(work, "serve.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_ready(url, "/ready", proc, 600):
            raise SystemExit(f"the server did not start; see {log.name}")
        result = asyncio.run(run(args, url, run_dir))
    finally:
        stop(proc)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
