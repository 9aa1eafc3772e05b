"""GET /metrics: parses as prometheus text, counts what was served, and stays correct with
several api processes (per-request metrics summed, engine-wide ones reported once)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from api_fake_engine import MODEL, api_client
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


ENGINE_WIDE = ("zeroserve:num_", "zeroserve:kv_cache", "zeroserve:prefix_cache")  # per replica


def value(all_samples: dict, name: str, **labels) -> float:
    if name.startswith(ENGINE_WIDE):
        labels.setdefault("replica", "r0")  # one engine without replicas reports as r0
    else:
        labels.setdefault("model_version", "v1")  # per-request metrics: the version that served it
    return all_samples[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


async def test_metrics_count_served_requests():
    async with api_client() as client:
        await client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3, "n": 2})
        await client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 8,
                "stop": "t1",
                "stream": True,
            },
        )
        await client.post("/v1/completions", json={"prompt": "OVERLOAD"})  # 429: not a success
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    s = samples(text)
    assert value(s, "zeroserve:request_success_total", finished_reason="length") == 2
    assert value(s, "zeroserve:request_success_total", finished_reason="stop") == 1
    assert value(s, "zeroserve:prompt_tokens_total") == 2 + 2  # "a b" once for n=2, "user: x"
    assert value(s, "zeroserve:generation_tokens_total") == 3 + 3 + 2
    assert value(s, "zeroserve:e2e_request_latency_seconds_count") == 3
    assert value(s, "zeroserve:time_to_first_token_seconds_count") == 3
    assert value(s, "zeroserve:inter_token_latency_seconds_count") == 2 + 2 + 1
    # measured by the scheduler: the stop string's from its first token; the refused one never queued
    assert value(s, "zeroserve:request_queue_time_seconds_count") == 3
    assert value(s, "zeroserve:request_decode_time_seconds_count") == 2  # the stop string's is unknown
    # engine-wide, from the engine's own stats
    assert value(s, "zeroserve:num_requests_running") == 3
    assert value(s, "zeroserve:num_requests_waiting") == 2
    assert value(s, "zeroserve:kv_cache_usage_perc") == 0.25
    assert value(s, "zeroserve:num_preemptions_total") == 7
    assert value(s, "zeroserve:prefix_cache_queries_total") == 1000
    assert value(s, "zeroserve:prefix_cache_hits_total") == 400


RECORD = textwrap.dedent("""
    import sys
    from zeroserve.api_proc.metrics import ApiMetrics
    from zeroserve.shared.messages import EngineStatus, SchedulerStats
    mode, path = sys.argv[1], sys.argv[2]
    stats = SchedulerStats(num_preemptions=7, num_running=3, prefix_cache_hits=40)
    engine = EngineStatus(
        model_name="test-model", max_model_len=8, vocab_size=8, draining=False, bad_frames=0, stats=stats
    )
    m = ApiMetrics("test-model", lambda: engine, metrics_dir=path)
    if mode == "record":
        m.first_token(0.0, 0.5)
        m.finished(0.0, 1.0, "stop", prompt_tokens=10, generation_tokens=5)
    else:
        sys.stdout.write(m.render().decode())
""")


def test_multiprocess_metrics_sum_requests_but_not_engine_stats(tmp_path):
    def run(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", RECORD, mode, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("record")
    run("record")  # a second api process
    s = samples(run("scrape"))  # a third one answers the scrape
    assert value(s, "zeroserve:request_success_total", finished_reason="stop") == 2
    assert value(s, "zeroserve:prompt_tokens_total") == 20
    assert value(s, "zeroserve:generation_tokens_total") == 10
    assert value(s, "zeroserve:time_to_first_token_seconds_count") == 2
    assert value(s, "zeroserve:e2e_request_latency_seconds_bucket", le="1.0") == 2
    assert value(s, "zeroserve:num_preemptions_total") == 7  # once, not once per process
    assert value(s, "zeroserve:num_requests_running") == 3
    assert value(s, "zeroserve:prefix_cache_hits_total") == 40
