"""`zeroserve bench serve|sweep` end to end against small fake OpenAI-compatible servers.

The fake server runs in a thread with its own event loop on a free loopback port and streams
one token per SSE chunk (a short sleep between chunks), with usage at the end when asked.
Modes: "ok"; "strict" refuses ignore_eos/min_tokens with a 400 (as OpenAI does), and without
ignore_eos stops after 3 tokens, like a model hitting EOS; "flaky" answers every 3rd request
with a 500 and breaks every 4th stream midway; "reject" answers every request with a 400.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
from aiohttp import web

from zeroserve.launcher.bench.cli import main

MODEL = "fake-model"


class FakeServer:
    def __init__(self, mode: str = "ok", token_delay: float = 0.002):
        self.mode, self.token_delay = mode, token_delay
        self.bodies: list[dict] = []  # every completion request body, in arrival order
        self.outcomes: list[str] = []  # "ok" / "http_500" / "stream_broken" per body
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self):
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def complete(self, request):
        body = await request.json()
        self.bodies.append(body)
        n = len(self.bodies)
        if body.get("model") != MODEL:
            return web.json_response(
                {"error": {"message": f"model {body.get('model')} not found"}}, status=404
            )
        if self.mode == "strict" and ("ignore_eos" in body or "min_tokens" in body):
            self.outcomes.append("http_400")
            field = "ignore_eos" if "ignore_eos" in body else "min_tokens"
            msg = f"Unrecognized request argument supplied: {field}"
            return web.json_response({"error": {"message": msg, "type": "invalid_request_error"}}, status=400)
        if self.mode == "reject":
            self.outcomes.append("http_400")
            return web.json_response(
                {"error": {"message": "This model's maximum context length is 16"}}, status=400
            )
        if self.mode == "flaky" and n % 3 == 0:
            self.outcomes.append("http_500")
            return web.json_response({"error": {"message": "boom"}}, status=500)
        chat = request.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        max_tokens = body["max_tokens"]
        n_out = max_tokens if (self.mode != "strict" or body.get("ignore_eos")) else min(3, max_tokens)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if chat:
            await send(
                {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            )
        for i in range(n_out):
            await asyncio.sleep(self.token_delay)
            if self.mode == "flaky" and n % 4 == 0 and i == n_out // 2:
                self.outcomes.append("stream_broken")
                request.transport.close()  # cut the chunked body short
                return resp
            piece = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
            finish = "length" if i == n_out - 1 else None
            await send({"choices": [{"index": 0, **piece, "finish_reason": finish}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": n_out}
            usage["total_tokens"] = usage["prompt_tokens"] + n_out
            await send({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        self.outcomes.append("ok")
        return resp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(url, tmp_path, *extra):
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--base-url", url, "--disable-tqdm", "--output-json", str(out), *extra]
    code = main(argv)
    return code, json.loads(out.read_text()) if out.exists() else None


def test_serve_writes_every_documented_field(tmp_path, capsys):
    png = tmp_path / "serve.png"
    with FakeServer() as server:
        code, res = _serve(
            server.base_url,
            tmp_path,
            "--num-prompts",
            "12",
            "--max-concurrency",
            "4",
            "--input-len",
            "20",
            "--output-len",
            "6",
            "--goodput",
            "ttft:5000,tpot:1000",
            "--percentiles",
            "50,90,99",
            "--plot",
            str(png),
        )
    assert code == 0
    # Probe + 1 warm-up + 12 timed requests; --model defaulted from /v1/models.
    assert len(server.bodies) == 14 and all(b["model"] == MODEL for b in server.bodies)
    timed = server.bodies[2:]
    assert all(
        b["stream"] and b["ignore_eos"] and b["min_tokens"] == 6 and b["max_tokens"] == 6 for b in timed
    )
    assert all(b["stream_options"] == {"include_usage": True} for b in timed)
    assert res["schema"] == "zeroserve-bench-serve/1" and res["model"] == MODEL
    assert (res["completed"], res["failed"], res["errors"], res["num_requests"]) == (12, 0, {}, 12)
    assert (
        res["total_output_tokens"] == 72 and res["usage_reported"] == 12 and res["output_len_mismatch"] == 0
    )
    assert res["total_input_tokens"] == sum(len(b["prompt"].split()) for b in timed)
    assert (
        res["fields_sent"] == ["ignore_eos", "min_tokens", "stream_options"] and res["fields_dropped"] == []
    )
    assert res["config"]["max_concurrency"] == 4 and res["config"]["request_rate"] is None
    assert "api_key" not in res["config"]
    assert res["duration_s"] > 0
    assert res["request_throughput"] == pytest.approx(12 / res["duration_s"])
    assert res["output_throughput"] == pytest.approx(72 / res["duration_s"])
    assert res["total_token_throughput"] > res["output_throughput"]
    assert 0 < res["mean_concurrency"] <= 4.0 + 1e-6
    assert res["goodput_fraction"] == 1.0 and res["goodput"] == pytest.approx(res["request_throughput"])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        values = [res[f"{s}_{metric}_ms"] for s in ("min", "median", "p90", "p99", "max")]
        # A client timestamps chunks per network read, so on a busy machine two chunks can
        # land in one read: an ITL of 0 is a true client-side measurement.
        assert values == sorted(values) and values[0] >= 0, metric
        assert (
            res[f"mean_{metric}_ms"] > 0
            and res[f"std_{metric}_ms"] >= 0
            and res[f"p50_{metric}_ms"] == res[f"median_{metric}_ms"]
        )
    assert res["mean_e2el_ms"] > res["mean_ttft_ms"]
    reqs = res["per_request"]
    assert len(reqs) == 12 and all(
        r["success"] and r["output_tokens"] == 6 and len(r["itl_ms"]) == 5 for r in reqs
    )
    assert all(r["e2el_ms"] >= r["ttft_ms"] + sum(r["itl_ms"]) - 0.01 for r in reqs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "P99 ITL (ms):" in out and "Goodput (req/s):" in out


def test_refused_extra_fields_are_dropped_with_a_warning(tmp_path, capsys):
    with FakeServer(mode="strict") as server:
        code, res = _serve(
            server.base_url,
            tmp_path,
            "--num-prompts",
            "5",
            "--output-len",
            "8",
            "--num-warmups",
            "0",
            "--endpoint",
            "chat",
            "--dataset",
            "chat",
            "--input-len",
            "5",
        )
    assert code == 0
    err = capsys.readouterr().err
    assert "ignore_eos" in err and "min_tokens" in err and "dropping" in err
    assert res["fields_dropped"] == ["ignore_eos", "min_tokens"] and res["fields_sent"] == ["stream_options"]
    # Refused probes first, then every timed request without the fields.
    assert server.outcomes[:2] == ["http_400", "http_400"] and server.outcomes[2:] == ["ok"] * 6
    assert all("ignore_eos" not in b and "min_tokens" not in b for b in server.bodies[3:])
    assert res["completed"] == 5 and res["failed"] == 0
    # Without ignore_eos the fake "hits EOS" after 3 tokens: counted from usage, and flagged.
    assert res["total_output_tokens"] == 15 and res["output_len_mismatch"] == 5
    assert any("output length" in w for w in res["warnings"])
    assert server.bodies[-1]["messages"][0]["role"] == "system"


def test_a_server_rejecting_every_request_stops_the_run_without_blaming_fields(tmp_path, capsys):
    with FakeServer(mode="reject") as server:
        code, res = _serve(server.base_url, tmp_path, "--num-prompts", "3")
    err = capsys.readouterr().err
    assert code == 2 and res is None
    assert "maximum context length" in err and "dropping" not in err
    # The probe tried with the fields, without ignore_eos/min_tokens, then without any: no more.
    assert len(server.bodies) == 3 and "stream_options" not in server.bodies[-1]


def test_failed_requests_are_counted_by_type(tmp_path):
    with FakeServer(mode="flaky") as server:
        code, res = _serve(
            server.base_url,
            tmp_path,
            "--num-prompts",
            "14",
            "--max-concurrency",
            "3",
            "--output-len",
            "6",
            "--input-len",
            "8",
            "--num-warmups",
            "0",
        )
    assert code == 0
    timed = server.outcomes[1:]  # the first request is the probe
    assert res["errors"] == {k: timed.count(k) for k in ("http_500", "stream_broken") if k in timed}
    assert res["errors"]["http_500"] >= 3 and res["errors"]["stream_broken"] >= 2
    assert res["completed"] == timed.count("ok") and res["failed"] == 14 - res["completed"]
    assert res["total_output_tokens"] == 6 * res["completed"]
    failed = [r for r in res["per_request"] if not r["success"]]
    assert all(r["ttft_ms"] is None and r["error"] in ("http_500", "stream_broken") for r in failed)


def test_rate_limited_arrivals_spread_the_run(tmp_path):
    with FakeServer(token_delay=0.0) as server:
        code, res = _serve(
            server.base_url,
            tmp_path,
            "--num-prompts",
            "8",
            "--request-rate",
            "40",
            "--burstiness",
            "2",
            "--output-len",
            "2",
            "--input-len",
            "4",
        )
    assert code == 0 and res["completed"] == 8
    starts = [r["start_s"] for r in res["per_request"]]
    assert starts == sorted(starts) and starts[-1] > 0.05  # 8 gaps of 25 ms on average
    assert res["config"]["request_rate"] == 40.0


def test_unreachable_server_is_a_clear_error(capsys):
    code = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{_free_port()}", "--disable-tqdm"])
    assert code == 2 and "cannot reach" in capsys.readouterr().err


def test_sweep_compares_targets_in_one_json_and_chart(tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    with FakeServer() as a, FakeServer(token_delay=0.004) as b:
        code = main(
            [
                "bench",
                "sweep",
                "--target",
                f"fast={a.base_url}",
                "--target",
                f"slow={b.base_url}",
                "--target",
                f"down=http://127.0.0.1:{_free_port()}",
                "--concurrency",
                "1,2",
                "--num-prompts",
                "4",
                "--output-len",
                "4",
                "--input-len",
                "6",
                "--disable-tqdm",
                "--output-json",
                str(out),
                "--plot",
                str(png),
            ]
        )
    assert code == 0
    sweep = json.loads(out.read_text())
    assert sweep["schema"] == "zeroserve-bench-sweep/1" and sweep["concurrency"] == [1, 2]
    by_name = {t["name"]: t for t in sweep["targets"]}
    assert "cannot reach" in by_name["down"]["error"] and by_name["down"]["runs"] == []
    for name in ("fast", "slow"):
        runs = by_name[name]["runs"]
        assert [r["concurrency"] for r in runs] == [1, 2] and all(r["completed"] == 4 for r in runs)
        assert all(
            "per_request" not in r and r["p99_ttft_ms"] > 0 and r["output_throughput"] > 0 for r in runs
        )
    # Same prompts for both servers at a given concurrency.
    assert [x["prompt"] for x in a.bodies] == [x["prompt"] for x in b.bodies]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "fast" in capsys.readouterr().out
