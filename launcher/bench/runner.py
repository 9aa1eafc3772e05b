"""Drive a server: probe which optional fields it takes, warm up, send the timed requests.

Arrivals: with --request-rate R the gaps between sends are drawn from a gamma distribution
of shape B (--burstiness) and mean 1/R: B = 1 is a Poisson process, B < 1 burstier, B > 1
more regular. With no rate every request is released at once, and --max-concurrency C caps
how many are in flight (a closed loop of C clients when the rate is infinite).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from zeroserve.launcher.bench.client import (
    ENDPOINT_PATHS,
    OPTIONAL_FIELDS,
    RequestResult,
    build_payload,
    first_model_id,
    send_request,
)
from zeroserve.launcher.bench.datasets import BenchRequest, TokenCounter, build_dataset, load_counter
from zeroserve.launcher.bench.metrics import compute_metrics, tpot

SCHEMA = "zeroserve-bench-serve/1"


@dataclass
class ServeConfig:
    base_url: str
    model: str | None = None
    endpoint: str = "completions"
    num_prompts: int = 100
    max_concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    dataset: str = "random"
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    num_system_prompts: int = 4
    system_prompt_len: int = 256
    turns: int = 3
    num_groups: int = 4  # shared-prefix
    prefix_len: int = 512
    goodput: dict = field(default_factory=dict)
    percentiles: tuple = (50, 90, 99)
    num_warmups: int = 1
    seed: int = 0
    temperature: float = 0.0
    api_key: str | None = None
    request_timeout: float = 600.0
    tokenizer: str | None = None
    fields: tuple = OPTIONAL_FIELDS  # optional fields to try; the probe may drop some
    disable_tqdm: bool = False


class Warnings(list):
    """Warnings shown on stderr as they happen and kept for the JSON."""

    def add(self, msg: str) -> None:
        print(f"zeroserve bench: warning: {msg}", file=sys.stderr, flush=True)
        self.append(msg)


def arrival_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds to wait before each of n sends: 0 for an infinite rate, else gamma(B, 1/(R*B))."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


def headers_for(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_session(cfg: ServeConfig) -> aiohttp.ClientSession:
    # No pool limit: --max-concurrency is the only cap, and aiohttp's default (100) would
    # silently hold back an unlimited burst.
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))


def prepare_requests(
    cfg: ServeConfig, counter: TokenCounter
) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """(timed requests, warm-up requests); warm-ups use another seed so they do not put the
    timed prompts into a prefix cache."""
    kw = dict(
        range_ratio=cfg.range_ratio,
        num_system_prompts=cfg.num_system_prompts,
        system_prompt_len=cfg.system_prompt_len,
        turns=cfg.turns,
        num_groups=cfg.num_groups,
        prefix_len=cfg.prefix_len,
    )
    timed = build_dataset(
        cfg.dataset, cfg.num_prompts, cfg.input_len, cfg.output_len, counter, cfg.seed, **kw
    )
    warm = build_dataset(
        cfg.dataset, max(cfg.num_warmups, 1), cfg.input_len, cfg.output_len, counter, cfg.seed + 1, **kw
    )
    return timed, warm[: cfg.num_warmups] if cfg.num_warmups else []


async def probe_fields(
    session: aiohttp.ClientSession,
    cfg: ServeConfig,
    url: str,
    model: str,
    req: BenchRequest,
    warnings: Warnings,
) -> tuple[tuple, tuple]:
    """Send one short request with every optional field; on a 400/422 drop the fields the
    error names (else ignore_eos+min_tokens, then stream_options) and try again.
    Returns (fields kept, fields dropped)."""
    fields, dropped, refusals = list(cfg.fields), [], []
    short = dataclasses.replace(req, output_len=min(req.output_len, 4))
    headers = headers_for(cfg.api_key)
    while True:
        res = await send_request(
            session, url, build_payload(cfg.endpoint, model, short, tuple(fields), cfg.temperature), headers
        )
        if res.success or res.status not in (400, 422) or not fields:
            break
        named = [f for f in fields if f in res.error_detail]
        drop = named or ([f for f in fields if f in ("ignore_eos", "min_tokens")] or fields[:1])
        refusals.append(
            f"the server refused the request with {', '.join(drop)} ({res.status}: "
            f"{res.error_detail[:160].strip()}); dropping {'it' if len(drop) == 1 else 'them'}"
            + ("; outputs may end before --output-len" if "stream_options" not in drop else "")
        )
        fields = [f for f in fields if f not in drop]
        dropped += drop
    if res.status not in (400, 422):  # only now is it sure that the fields, not the request, were refused
        for msg in refusals:
            warnings.add(msg)
    if res.error == "connection":
        raise RuntimeError(f"cannot reach {url}: {res.error_detail}")
    if not res.success:
        if res.status in (400, 401, 403, 404, 422):
            raise RuntimeError(
                f"the server rejects the benchmark's requests ({res.status}): {res.error_detail[:300]}"
            )
        warnings.add(f"the probe request failed ({res.error}: {res.error_detail[:160]}); going on")
    elif "stream_options" in fields and not res.usage_reported:
        warnings.add("the server sends no usage in its stream; output tokens are counted as text chunks")
    return tuple(fields), tuple(dropped)


async def _send_all(
    session,
    cfg: ServeConfig,
    url: str,
    model: str,
    requests: list[BenchRequest],
    fields: tuple,
    gaps: list[float],
    desc: str,
) -> tuple[list[RequestResult], float, float]:
    """Send every request after its arrival gap, at most max_concurrency at once.
    Returns (results in request order, start perf_counter, last completion perf_counter)."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    headers = headers_for(cfg.api_key)
    bar = tqdm(
        total=len(requests),
        desc=desc,
        file=sys.stderr,
        disable=cfg.disable_tqdm,
        unit="req",
        leave=desc != "warm-up",
    )
    end = 0.0

    async def one(req: BenchRequest) -> RequestResult:
        nonlocal end
        payload = build_payload(cfg.endpoint, model, req, fields, cfg.temperature)
        if sem is None:
            res = await send_request(session, url, payload, headers, req)
        else:
            async with sem:
                res = await send_request(session, url, payload, headers, req)
        end = max(end, time.perf_counter())
        bar.update(1)
        return res

    tasks = []
    start = time.perf_counter()
    for req, gap in zip(requests, gaps):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(req)))
    try:
        results = await asyncio.gather(*tasks)
    finally:
        bar.close()
    return list(results), start, end or time.perf_counter()


# zeroserve's names, under either of its --metrics-prefix values (vLLM's own server uses vllm: too)
PREFIX_HITS, PREFIX_QUERIES = "prefix_cache_hits", "prefix_cache_queries"
METRIC_PREFIXES = ("zeroserve", "vllm")
STATS_SETTLE_S = 1.5  # an api process refreshes the engine's stats every second


async def prefix_cache_counts(session: aiohttp.ClientSession, cfg: ServeConfig) -> tuple[float, float] | None:
    """(hits, queries) in tokens from the server's /metrics, summed over its replicas; None when
    it does not export them (another server, or an older zeroserve)."""
    url = cfg.base_url.rstrip("/") + "/metrics"
    try:
        async with session.get(url, headers=headers_for(cfg.api_key)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
    return prefix_counts_of(text)


def prefix_counts_of(text: str) -> tuple[float, float] | None:
    """(hits, queries) summed over every sample (replicas) of a Prometheus text scrape."""
    totals = {PREFIX_HITS: 0.0, PREFIX_QUERIES: 0.0}
    seen = False
    for line in text.splitlines():
        prefix, colon, name = line.split("{", 1)[0].split(" ", 1)[0].partition(":")
        name = name.removesuffix("_total")
        if colon and prefix in METRIC_PREFIXES and name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
            seen = True
    return (totals[PREFIX_HITS], totals[PREFIX_QUERIES]) if seen else None


async def run_serve(
    cfg: ServeConfig,
    requests: list[BenchRequest] | None = None,
    warmups: list[BenchRequest] | None = None,
    counter: TokenCounter | None = None,
) -> dict:
    """One benchmark run; returns the JSON-ready result (see report.py for the fields)."""
    if cfg.endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"unknown endpoint {cfg.endpoint!r}: use completions or chat")
    warnings = Warnings()
    url = cfg.base_url.rstrip("/") + ENDPOINT_PATHS[cfg.endpoint]
    async with make_session(cfg) as session:
        model = cfg.model or await first_model_id(session, cfg.base_url, headers_for(cfg.api_key))
        if requests is None:
            counter = counter or load_counter(cfg.tokenizer, model)
            requests, warmups = prepare_requests(cfg, counter)
        warmups = warmups or []
        fields, dropped = await probe_fields(session, cfg, url, model, (warmups or requests)[0], warnings)
        if warmups:
            warm, _, _ = await _send_all(
                session, cfg, url, model, warmups, fields, [0.0] * len(warmups), "warm-up"
            )
            if failed := [r for r in warm if not r.success]:
                warnings.add(f"{len(failed)} of {len(warm)} warm-up requests failed ({failed[0].error})")
        gaps = arrival_gaps(len(requests), cfg.request_rate, cfg.burstiness, random.Random(cfg.seed))
        if (cache_before := await prefix_cache_counts(session, cfg)) is not None:
            await asyncio.sleep(STATS_SETTLE_S)  # let the warm-ups' counts reach /metrics first
            cache_before = await prefix_cache_counts(session, cfg)
        results, start, end = await _send_all(session, cfg, url, model, requests, fields, gaps, cfg.base_url)
        cache_after = None
        if cache_before is not None:
            await asyncio.sleep(STATS_SETTLE_S)
            cache_after = await prefix_cache_counts(session, cfg)
    metrics = compute_metrics(results, end - start, cfg.percentiles, cfg.goodput)
    if (
        metrics["completed"]
        and metrics["usage_reported"] < metrics["completed"]
        and "stream_options" in fields
    ):
        warnings.add(
            f"{metrics['completed'] - metrics['usage_reported']} responses had no usage; their tokens are text chunks"
        )
    if metrics["output_len_mismatch"]:
        warnings.add(
            f"{metrics['output_len_mismatch']} requests did not get exactly the output length asked for"
        )
    hit_rate = None
    if cache_before is not None and cache_after is not None and cache_after[1] > cache_before[1]:
        hit_rate = (cache_after[0] - cache_before[0]) / (cache_after[1] - cache_before[1])
    if metrics["failed"]:
        warnings.add(f"{metrics['failed']} of {len(results)} requests failed: {metrics['errors']}")
    return {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base_url": cfg.base_url,
        "model": model,
        "config": _config_dict(cfg),
        "tokenizer": counter.name if counter is not None else "given",
        "num_requests": len(results),
        "fields_sent": list(fields),
        "fields_dropped": list(dropped),
        **metrics,
        "prefix_cache_hit_rate": hit_rate,
        "warnings": list(warnings),
        "per_request": [_request_record(r, start) for r in results],
    }


def _config_dict(cfg: ServeConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("api_key")  # never write a secret into a results file
    d["request_rate"] = None if math.isinf(cfg.request_rate) else cfg.request_rate  # JSON has no inf
    d["percentiles"] = list(cfg.percentiles)
    d["fields"] = list(cfg.fields)
    return d


def _request_record(r: RequestResult, bench_start: float) -> dict:
    t = tpot(r)
    ms = lambda s: round(s * 1000.0, 3)  # noqa: E731
    return {
        "start_s": round(r.start - bench_start, 6),
        "success": r.success,
        "error": r.error,
        "error_detail": r.error_detail or None,
        "prompt_tokens": r.prompt_tokens if r.prompt_tokens is not None else r.expected_prompt_len,
        "output_tokens": r.output_tokens,
        "expected_output_len": r.expected_output_len,
        "ttft_ms": ms(r.ttft) if r.success else None,
        "tpot_ms": ms(t) if r.success and t is not None else None,
        "e2el_ms": ms(r.latency) if r.success else None,
        "itl_ms": [ms(g) for g in r.itl] if r.success else [],
    }
