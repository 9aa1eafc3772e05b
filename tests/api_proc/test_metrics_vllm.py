"""/metrics with vLLM's names: --metrics-prefix vllm renames every metric, and each of vLLM's
request, token, parameter and engine metrics is there with the values the requests imply."""

from __future__ import annotations

import msgspec
from api_fake_engine import MODEL, FakeEngineClient, api_client
from prometheus_client.parser import text_string_to_metric_families

from zeroserve.shared.messages import BucketCounts

# every vLLM name zeroserve exports (after the prefix), as a scrape shows the samples
VLLM_SAMPLES = [
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
    "prefix_cache_queries_total", "prefix_cache_hits_total", "iteration_tokens_total_bucket",
    "cache_config_info", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
    "time_per_output_token_seconds_bucket", "request_time_per_output_token_seconds_bucket",
    "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
    "request_prefill_time_seconds_bucket", "request_decode_time_seconds_bucket",
    "request_inference_time_seconds_bucket", "request_prompt_tokens_bucket",
    "request_generation_tokens_bucket", "request_max_num_generation_tokens_bucket",
    "request_params_n_bucket", "request_params_max_tokens_bucket",
    "request_prefill_kv_computed_tokens_bucket", "prompt_tokens_total", "prompt_tokens_cached_total",
    "generation_tokens_total", "request_success_total",
]  # fmt: skip


def scrape(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def one(samples, name: str, **labels) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def serve_some(prefix: str) -> str:
    fake = FakeEngineClient()
    steps = BucketCounts(bounds=[1, 8, 16], counts=[0, 5, 2, 1], total=70.0)
    fake.stats = msgspec.structs.replace(fake.stats, iteration_tokens=steps, num_kv_blocks=123)
    async with api_client(fake, metrics_prefix=prefix) as client:
        r = await client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3, "n": 2})
        assert r.status == 200
        r = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        )
        assert r.status == 200
        assert (await client.post("/v1/completions", json={"prompt": "OVERLOAD"})).status == 429
        assert (await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0})).status == 400
        return await (await client.get("/metrics")).text()


async def test_vllm_prefix_names_every_metric_as_vllm_does():
    text = await serve_some("vllm")
    samples = scrape(text)
    names = {n for n, _, _ in samples}
    assert all(n.startswith("vllm:") for n in names), sorted(n for n in names if not n.startswith("vllm:"))
    missing = [n for n in VLLM_SAMPLES if f"vllm:{n}" not in names]
    assert not missing
    s = samples
    # two requests: n=2 with 3 tokens each, n=1 with 4; parameters once per request (n, most
    # tokens of a choice) or per choice (max_tokens), as vLLM counts them
    assert one(s, "vllm:request_params_n_count") == 2 and one(s, "vllm:request_params_n_sum") == 3
    assert one(s, "vllm:request_max_num_generation_tokens_sum") == 3 + 4
    assert one(s, "vllm:request_params_max_tokens_count") == 3
    assert one(s, "vllm:request_params_max_tokens_sum") == 3 + 3 + 4
    assert one(s, "vllm:request_generation_tokens_sum") == 3 + 3 + 4
    assert one(s, "vllm:request_prompt_tokens_count") == 2  # the n=2 prompt once
    assert one(s, "vllm:request_time_per_output_token_seconds_count") == 3
    # the engine's phases, as its last delta carried them (the fake: queue 1 ms, decode 3 ms a token)
    assert abs(one(s, "vllm:request_queue_time_seconds_sum") - 0.003) < 1e-9
    assert abs(one(s, "vllm:request_decode_time_seconds_sum") - (0.006 + 0.006 + 0.009)) < 1e-9
    assert one(s, "vllm:request_inference_time_seconds_count") == 3
    assert one(s, "vllm:request_success_total", finished_reason="length") == 3
    # engine-wide, per replica
    assert one(s, "vllm:iteration_tokens_total_bucket", le="8.0", replica="r0") == 5
    assert one(s, "vllm:iteration_tokens_total_bucket", le="+Inf", replica="r0") == 8
    assert one(s, "vllm:iteration_tokens_total_sum", replica="r0") == 70
    info = [lab for n, lab, _ in samples if n == "vllm:cache_config_info"]
    assert info == [
        {
            "model_name": MODEL, "replica": "r0", "engine": "0", "block_size": "16", "cache_dtype": "auto",
            "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9", "num_gpu_blocks": "123",
        }
    ]  # fmt: skip
    # errors by HTTP status and reason: the engine's 429, the API's own 400
    errors = {(lab["status"], lab["reason"]): v for n, lab, v in samples if n == "vllm:request_errors_total"}
    assert errors == {("429", "rate_limit_error"): 1, ("400", "invalid_request_error"): 1}


async def test_the_default_prefix_is_zeroserve():
    names = {n for n, _, _ in scrape(await serve_some("zeroserve"))}
    assert {f"zeroserve:{n}" for n in VLLM_SAMPLES} <= names
    assert not any(n.startswith("vllm:") for n in names)
