"""What the audit trail costs the request path: the same load with auditing off and on.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_audit.py serve [--rounds 3] [--concurrency 64]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_audit.py api [--requests 4000]

serve: two `zeroserve serve` (the packaged SmolLM2 GGUF), one with --audit-db off, one recording
every request into SQLite (--audit-content hash: the costlier setting, prompts and outputs
hashed), both up at once and idle between rounds; `zeroserve bench serve` drives them in
interleaved rounds (off, on, off, on, ...) so that a drift of the machine hits both alike.

api: the api process alone (create_app over the fake engine of tests/api_proc, 1 output token,
no model), where the audit's share of each request is largest; requests/s over HTTP on
loopback, interleaved rounds as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_peers import wait_ready  # this folder: the one way the benchmarks wait for a server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zeroserve() -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "zeroserve")]


def start(port: int, state: str, audit: bool) -> subprocess.Popen:
    args = [
        "serve",
        "--port",
        str(port),
        "--state-dir",
        state,
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "64",
    ]
    args += ["--audit-content", "hash"] if audit else ["--audit-db", "off"]
    log = open(os.path.join(state, "server.log"), "w")
    return subprocess.Popen(zeroserve() + args, stdout=log, stderr=subprocess.STDOUT)


def bench_round(port: int, args: argparse.Namespace, out: str) -> dict:
    cmd = zeroserve() + [
        "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--num-warmups", str(args.num_warmups_sent), "--disable-tqdm",
        "--output-json", out,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out) as f:
        return json.load(f)


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes under `zeroserve serve` pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{child}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = argv[argv.index(b"proc") + 1].decode() if b"proc" in argv else "other"
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def serve(args: argparse.Namespace) -> None:
    from tests.conftest import free_port

    tmp = tempfile.mkdtemp(prefix="zs-bench-audit-")
    ports = {"off": free_port(), "on": free_port()}
    procs = {}
    try:
        for mode, port in ports.items():
            state = os.path.join(tmp, mode)
            os.makedirs(state)
            procs[mode] = start(port, state, mode == "on")
        for mode, port in ports.items():
            if not wait_ready(f"http://127.0.0.1:{port}", "/ready", procs[mode], 300):
                raise RuntimeError(f"the audit-{mode} server on {port} was not ready")
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                before = cpu_by_role(procs[mode].pid)
                res = bench_round(ports[mode], args, os.path.join(tmp, f"{mode}-{r}.json"))
                after = cpu_by_role(procs[mode].pid)
                n = res["completed"] + args.num_warmups_sent
                res["api_cpu_ms_per_request"] = (after["api"] - before["api"]) / n * 1000
                res["all_cpu_ms_per_request"] = (sum(after.values()) - sum(before.values())) / n * 1000
                results[mode].append(res)
                print(
                    f"round {r} audit {mode:3}: {res['request_throughput']:.2f} req/s, "
                    f"{res['output_throughput']:.1f} output tok/s, TTFT p50 {res['median_ttft_ms']:.0f} ms, "
                    f"e2e p50 {res['median_e2el_ms']:.0f} ms; CPU per request: api process "
                    f"{res['api_cpu_ms_per_request']:.2f} ms, all processes {res['all_cpu_ms_per_request']:.1f} ms",
                    flush=True,
                )
        summarize(results, "output_throughput", "output tok/s")
        summarize(results, "median_e2el_ms", "e2e p50 ms")
        summarize(results, "api_cpu_ms_per_request", "api process CPU ms per request")
        summarize(results, "all_cpu_ms_per_request", "all processes CPU ms per request")
        records = count_records(os.path.join(tmp, "on", "audit.db"))
        print(f"audit records written by the 'on' server: {records}")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


def count_records(path: str) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM zeroserve_audit").fetchone()[0]


def summarize(results: dict[str, list[dict]], key: str, what: str) -> None:
    off = statistics.mean(r[key] for r in results["off"])
    on = statistics.mean(r[key] for r in results["on"])
    spread = {m: (min(r[key] for r in results[m]), max(r[key] for r in results[m])) for m in results}
    med = {m: statistics.median(r[key] for r in results[m]) for m in results}
    print(
        f"{what}: mean off {off:.2f} (rounds {spread['off'][0]:.2f}..{spread['off'][1]:.2f}), "
        f"on {on:.2f} ({spread['on'][0]:.2f}..{spread['on'][1]:.2f}): {(on - off) / off * 100:+.1f}%; "
        f"median off {med['off']:.2f}, on {med['on']:.2f}: {(med['on'] - med['off']) / med['off'] * 100:+.1f}%"
    )


# ------------------------------------------------------------------------------------- api only


async def api_rounds(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests", "api_proc"))
    import aiohttp
    from aiohttp import web
    from api_fake_engine import FakeEngineClient, make_config

    from tests.conftest import free_port
    from zeroserve.api_proc.app import create_app

    tmp = tempfile.mkdtemp(prefix="zs-bench-audit-api-")
    sites = {}
    try:
        for mode in ("off", "on"):
            extra = {}
            if mode == "on":
                url = "sqlite:///" + os.path.join(tmp, "audit.db").lstrip("/")
                extra = {"audit_store": url, "state_dir": tmp, "audit_content": "hash"}
            app = create_app(make_config(**extra), FakeEngineClient(max_model_len=4096))
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            sites[mode] = (runner, port)
        body = {"prompt": "one two three four", "max_tokens": 1}
        results: dict[str, list[float]] = {"off": [], "on": []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for r in range(args.rounds):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    url = f"http://127.0.0.1:{sites[mode][1]}/v1/completions"
                    rate = await closed_loop(session, url, body, args.requests, args.concurrency)
                    results[mode].append(rate)
                    print(f"round {r} audit {mode:3}: {rate:.0f} req/s", flush=True)
        off, on = statistics.mean(results["off"]), statistics.mean(results["on"])
        print(f"api only: off {off:.0f} req/s, on {on:.0f} req/s ({(on - off) / off * 100:+.1f}%)")
    finally:
        for runner, _ in sites.values():
            await runner.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


async def closed_loop(session, url: str, body: dict, total: int, concurrency: int) -> float:
    left = total

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, json=body) as resp:
                await resp.read()
                assert resp.status == 200

    start_t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return total / (time.perf_counter() - start_t)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--concurrency", type=int, default=64)
    s.add_argument("--num-prompts", type=int, default=192)
    s.add_argument("--input-len", type=int, default=64)
    s.add_argument("--output-len", type=int, default=32)
    a = sub.add_parser("api")
    a.add_argument("--rounds", type=int, default=6)
    a.add_argument("--concurrency", type=int, default=64)
    a.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    args.num_warmups_sent = 4
    sys.path.insert(0, ROOT)
    if args.mode == "serve":
        serve(args)
    else:
        asyncio.run(api_rounds(args))


if __name__ == "__main__":
    main()
