"""Prometheus metrics for GET /metrics: vLLM's names, types and labels after the prefix
``zeroserve:`` (``--metrics-prefix vllm``: ``vllm:``, so vLLM's dashboards and llm-d's scrapers
read zeroserve unchanged), the label ``model_name`` on each.

Three sources, so that N api processes report the truth:
- per-request metrics are recorded here as each choice finishes (TTFT, ITL, e2e, tokens,
  parameters, finish reasons, errors); with ``metrics_dir`` they live in prometheus_client's
  multiprocess files and a scrape of any api process sums every process' files;
- the engine phases of a request (queue, prefill, decode, inference time) are measured by the
  scheduler, which sees both ends of each, and arrive on its last delta (``RequestTimings``;
  queue and prefill already on the first token's). A request that a stop string ends in the
  tokenizer counts its queue and prefill time only; one that fails before its first token
  counts in none of the four;
- engine-wide numbers (running / waiting requests, KV usage, preemptions, prefix cache, tokens
  per step, the KV cache's shape) are the engine's own, read from the latest Pong at scrape
  time by ``EngineStatsCollector``: each scrape reports them once, whichever process answers.
  They carry a ``replica`` label (``r0`` ... with ``--data-parallel-size``): each replica has
  its own queue and KV pool. The routers' numbers (decisions per replica and reason, matched
  prefix blocks per decision, the time a decision takes, failovers) come the same way, from
  every tokenizer's latest Pong, summed over the tokenizers.

ITL: a delta carrying k tokens after a gap g counts as k intervals of g / k.
time_per_output_token_seconds is vLLM's older name for the same per-token samples;
request_time_per_output_token_seconds is one sample per request, (e2e - TTFT) / (tokens - 1)
as the api saw them. Buckets are vLLM's, some with finer bounds added (a superset: vLLM's
``le`` values all exist); token-count buckets run 1, 2, 5, 10, ... to 10^6 (vLLM's stop at
max_model_len, which an api process does not know when it starts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString

from zeroserve.shared.messages import BucketCounts, EngineStatus, RequestTimings, RouterStats

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
LABELS = ["model_name"]
# per-request metrics: also the version that served it (api_proc/versions.py; "v1" for one model)
REQUEST_LABELS = ["model_name", "model_version"]
PREFIXES = ("zeroserve", "vllm")

# fmt: off
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
N_BUCKETS = [1, 2, 5, 10, 20]
# fmt: on


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


TOKEN_BUCKETS = buckets_1_2_5(1_000_000)

# SchedulerStats field -> (name after the prefix, help, kind)
ENGINE_STATS = {
    "num_running": ("num_requests_running", "Requests the engine is running now.", "gauge"),
    "num_waiting": ("num_requests_waiting", "Requests waiting in the engine's queue.", "gauge"),
    "kv_cache_usage": ("kv_cache_usage_perc", "KV-cache usage, 1 = full.", "gauge"),
    "num_preemptions": ("num_preemptions", "Preemptions since the engine started.", "counter"),
    "prefix_cache_queries": (
        "prefix_cache_queries",
        "Prefix cache queries, in prompt tokens looked up.",
        "counter",
    ),
    "prefix_cache_hits": ("prefix_cache_hits", "Prefix cache hits, in prompt tokens found.", "counter"),
    "num_steps_over_target": (
        "steps_over_itl_target",
        "Steps whose decodes alone were predicted past --target-itl-ms (prefills got the minimum share).",
        "counter",
    ),
    "step_cost_error": (
        "step_cost_model_error",
        "Mean relative error of the step cost model's time predictions, each made before the step "
        "was learned (what --target-itl-ms and deadline checks rely on).",
        "gauge",
    ),
}


def enable_multiprocess(metrics_dir: str) -> None:
    """Switch prometheus_client to its mmap files in metrics_dir, whatever the import order.

    The library reads PROMETHEUS_MULTIPROC_DIR itself (when a metric is created), so the
    variable is set here, for it; our own settings never come from it.
    """
    from prometheus_client import values

    os.makedirs(metrics_dir, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if getattr(values.ValueClass, "__name__", "") != "MmapedValue":
        values.ValueClass = values.MultiProcessValue()


def histogram_family(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def add_buckets(family: HistogramMetricFamily, label_values: list[str], h: BucketCounts) -> None:
    """One histogram from per-bucket (not cumulative) counts, as BucketCounts carries them;
    bounds written as prometheus_client writes its own ("8.0")."""
    cumulative, buckets = 0, []
    for bound, count in zip([*map(floatToGoString, h.bounds), "+Inf"], h.counts, strict=True):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    family.add_metric(label_values, buckets, sum_value=h.total)


class CacheInfo:
    """The KV cache's settings for cache_config_info (vLLM's label names)."""

    def __init__(
        self, block_size: int, cache_dtype: str, enable_prefix_caching: bool, gpu_memory_utilization: float
    ):
        self.labels = {
            "block_size": str(block_size),
            "cache_dtype": cache_dtype,
            "enable_prefix_caching": str(enable_prefix_caching),
            "gpu_memory_utilization": str(gpu_memory_utilization),
        }


class EngineStatsCollector:
    """Engine-wide gauges and counters per replica from the latest Pong, and the routers'
    counters from every tokenizer's, read at scrape time."""

    def __init__(
        self,
        model_name: str,
        engine: Callable[[], EngineStatus | None],
        routers: Callable[[], list[RouterStats]] = list,
        prefix: str = "zeroserve",
        cache_info: CacheInfo | None = None,
    ):
        self.model_name = model_name
        self.engine = engine
        self.routers = routers
        self.prefix = prefix
        self.cache_info = cache_info

    def collect(self):
        engine = self.engine()
        p = self.prefix
        if engine is not None:  # else not reported yet: absent rather than made-up zeros
            # a tokenizer that lists no replicas (one fixed scheduler, an older one) reports r0
            replicas = [(r.replica_id, r.stats) for r in engine.replicas] or [("r0", engine.stats)]
            for field, (name, doc, kind) in ENGINE_STATS.items():
                family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                    f"{p}:{name}", doc, labels=[*LABELS, "replica"]
                )
                for replica_id, stats in replicas:
                    family.add_metric([self.model_name, replica_id], float(getattr(stats, field)))
                yield family
            steps = histogram_family(
                f"{p}:iteration_tokens_total", "Tokens computed per engine step.", [*LABELS, "replica"]
            )
            for replica_id, stats in replicas:
                if stats.iteration_tokens is not None:
                    add_buckets(steps, [self.model_name, replica_id], stats.iteration_tokens)
            yield steps
            if self.cache_info is not None:
                yield self.cache_config(replicas)
        routers = self.routers()
        if routers:
            yield from self.router_families(routers)

    def cache_config(self, replicas) -> GaugeMetricFamily:
        """vLLM's info-style gauge (always 1): the KV cache's settings in its labels."""
        info = self.cache_info.labels
        names = [*LABELS, "replica", "engine", *info, "num_gpu_blocks"]
        family = GaugeMetricFamily(f"{self.prefix}:cache_config_info", "The KV cache's configuration.",
                                   labels=names)  # fmt: skip
        for i, (replica_id, stats) in enumerate(replicas):
            values = [self.model_name, replica_id, str(i), *info.values(), str(stats.num_kv_blocks)]
            family.add_metric(values, 1.0)
        return family

    def router_families(self, routers: list[RouterStats]):
        p = self.prefix
        decisions: dict[tuple[str, str], int] = {}
        for router in routers:
            for d in router.decisions:
                decisions[(d.replica_id, d.reason)] = decisions.get((d.replica_id, d.reason), 0) + d.count
        family = CounterMetricFamily(
            f"{p}:router_requests",
            "Routing decisions, by the replica chosen and why (prefix, load, balance, session, "
            "round_robin, least_loaded).",
            labels=[*LABELS, "replica", "reason"],
        )
        for (replica_id, reason), count in sorted(decisions.items()):
            family.add_metric([self.model_name, replica_id, reason], float(count))
        yield family
        failovers = CounterMetricFamily(
            f"{p}:router_failovers",
            "Requests re-sent to another replica after theirs failed before their first token.",
            labels=LABELS,
        )
        failovers.add_metric([self.model_name], float(sum(r.failovers for r in routers)))
        yield failovers
        yield self.histogram(
            f"{p}:router_matched_prefix_blocks",
            "Leading KV blocks of the prompt the chosen replica held, per routing decision.",
            [r.matched_blocks for r in routers],
        )
        yield self.histogram(
            f"{p}:router_decision_time_seconds",
            "Time the router took to choose a replica.",
            [r.decision_seconds for r in routers],
        )

    def histogram(self, name: str, doc: str, parts: list[BucketCounts]) -> HistogramMetricFamily:
        """The sum of the tokenizers' histograms (their bounds are the same constants)."""
        bounds = parts[0].bounds
        counts = [0] * (len(bounds) + 1)
        total = 0.0
        for h in parts:
            if h.bounds == bounds and len(h.counts) == len(counts):
                counts = [a + b for a, b in zip(counts, h.counts, strict=True)]
                total += h.total
        family = histogram_family(name, doc, LABELS)
        add_buckets(family, [self.model_name], BucketCounts(bounds, counts, total))
        return family


class ParentRequest:
    """The n choices of one prompt: vLLM observes n and the most tokens a choice generated
    once per request, when its last choice has finished."""

    __slots__ = ("n", "max_tokens", "remaining", "most_tokens")

    def __init__(self, n: int, max_tokens: int):
        self.n = n
        self.max_tokens = max_tokens  # as asked; <= 0: not given
        self.remaining = n
        self.most_tokens = 0


class ApiMetrics:
    def __init__(
        self,
        model_name: str,
        engine: Callable[[], EngineStatus | None],
        metrics_dir: str | None = None,
        routers: Callable[[], list[RouterStats]] = list,
        prefix: str = "zeroserve",
        cache_info: CacheInfo | None = None,
    ):
        if prefix not in PREFIXES:
            raise ValueError(f"metrics prefix {prefix!r}: use one of {', '.join(PREFIXES)}")
        self.model_name = model_name
        self.metrics_dir = metrics_dir
        self.prefix = prefix
        self.engine_stats = EngineStatsCollector(model_name, engine, routers, prefix, cache_info)
        if metrics_dir is not None:
            enable_multiprocess(metrics_dir)
            self.registry = None  # values live in the files; a scrape builds a registry over them
        else:
            self.registry = CollectorRegistry()
            self.registry.register(self.engine_stats)
        reg = self.registry

        # families with REQUEST_LABELS; view(model, version) binds them (RequestMetrics)
        def histogram(name: str, doc: str, buckets: list[float]):
            return Histogram(f"{prefix}:{name}", doc, REQUEST_LABELS, buckets=buckets, registry=reg)

        def counter(name: str, doc: str):
            return Counter(f"{prefix}:{name}", doc, REQUEST_LABELS, registry=reg)

        # latency as the client sees it (this process' clock)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Time between output tokens (vLLM's older name for inter_token_latency_seconds).",
            ITL_BUCKETS,
        )
        self.request_tpot = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (e2e - TTFT) / (output tokens - 1).",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Request latency, arrival to last token.", LATENCY_BUCKETS
        )
        # the engine's phases, measured by the scheduler
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Time a request spent waiting in the engine's queue.",
            LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "First scheduled to first token (prefill).", LATENCY_BUCKETS
        )
        self.decode_time = histogram(
            "request_decode_time_seconds", "First token to last token (decode).", LATENCY_BUCKETS
        )
        self.inference_time = histogram(
            "request_inference_time_seconds", "First scheduled to last token (running).", LATENCY_BUCKETS
        )
        # sizes and parameters, per request
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens of a request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens a request generated.", TOKEN_BUCKETS
        )
        self.prefill_kv_computed = histogram(
            "request_prefill_kv_computed_tokens",
            "Prompt tokens a request computed (not found in the prefix cache).",
            TOKEN_BUCKETS,
        )
        self.max_generation_tokens = histogram(
            "request_max_num_generation_tokens",
            "The most tokens one of a request's n choices generated.",
            TOKEN_BUCKETS,
        )
        self.params_n = histogram("request_params_n", "The request's n.", N_BUCKETS)
        self.params_max_tokens = histogram(
            "request_params_max_tokens", "The request's max_tokens (when given).", TOKEN_BUCKETS
        )
        # totals
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.prompt_tokens_cached = counter(
            "prompt_tokens_cached", "Prompt tokens of finished requests found in the prefix cache."
        )
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter(
            f"{prefix}:request_success",
            "Requests finished, by finish reason.",
            [*REQUEST_LABELS, "finished_reason"],
            registry=reg,
        )
        self._errors = Counter(
            f"{prefix}:request_errors",
            "Requests answered with an error (or ended by one mid-stream), by HTTP status and "
            "reason (the OpenAI error code or type; client_disconnected: the client left first).",
            [*REQUEST_LABELS, "status", "reason"],
            registry=reg,
        )
        # per tenant (docs/audit.md): the label's values are the configured tenants' names alone
        self._tenant_requests = Counter(
            f"{prefix}:tenant_requests",
            "Requests by tenant (the name of the API key).",
            [*LABELS, "tenant"],
            registry=reg,
        )
        self._tenant_prompt_tokens = Counter(
            f"{prefix}:tenant_prompt_tokens", "Prompt tokens by tenant.", [*LABELS, "tenant"], registry=reg
        )
        self._tenant_generation_tokens = Counter(
            f"{prefix}:tenant_generation_tokens",
            "Tokens generated, by tenant.",
            [*LABELS, "tenant"],
            registry=reg,
        )
        self.audit_records_dropped = Counter(
            f"{prefix}:audit_records_dropped",
            "Audit records dropped because the spool was full (the database out of reach for too long).",
            LABELS,
            registry=reg,
        ).labels(model_name)
        self.collectors: list[Any] = []  # scrape-time collectors beside the engine's (add_collector)
        self._views: dict[tuple[str, str], RequestMetrics] = {}
        self.default = self.view(model_name, "v1")

    def view(self, model: str, version: str) -> RequestMetrics:
        """The per-request metrics of one (model, version), made once."""
        key = (model, version)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = RequestMetrics(self, model, version)
        return v

    def add_collector(self, collector: Any) -> None:
        """A collector read at each scrape (as the engine's stats are: never summed over processes)."""
        self.collectors.append(collector)
        if self.registry is not None:
            self.registry.register(collector)

    # ------------------------------------------------------------------ recording

    def first_token(self, arrival: float, now: float) -> None:
        self.default.first_token(arrival, now)

    def tokens_after_gap(self, gap_s: float, num_tokens: int) -> None:
        self.default.tokens_after_gap(gap_s, num_tokens)

    def finished(self, *args: Any, **kwargs: Any) -> None:
        self.default.finished(*args, **kwargs)

    def error(
        self, status: int, reason: str | None, model: str | None = None, version: str | None = None
    ) -> None:
        """model/version: the version that served it; None (not routed, e.g. an unknown model:
        never a label value taken from the request) counts under this server's model, version ""."""
        labels = (model, version) if model is not None and version is not None else (self.model_name, "")
        self._errors.labels(*labels, str(status), reason or f"http_{status}").inc()

    def tenant_finished(self, tenant: str, prompt_tokens: int, generation_tokens: int) -> None:
        """One request of ``tenant`` ended (any outcome), with its usage."""
        self._tenant_requests.labels(self.model_name, tenant).inc()
        self._tenant_prompt_tokens.labels(self.model_name, tenant).inc(prompt_tokens)
        self._tenant_generation_tokens.labels(self.model_name, tenant).inc(generation_tokens)

    def audit_dropped(self, count: int) -> None:
        """Called from the audit writer's thread (prometheus_client's values are thread-safe)."""
        self.audit_records_dropped.inc(count)

    def record_sink(self, record) -> None:
        """A request sink (request_log.py): counts each request that ended in an error."""
        if record.status >= 400 or record.error_type is not None:
            self.error(record.status, record.error_type, record.model, record.version)

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        if self.metrics_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        registry.register(self.engine_stats)
        for collector in self.collectors:
            registry.register(collector)
        return generate_latest(registry)


class RequestMetrics:
    """ApiMetrics' per-request metrics bound to one (model_name, model_version)."""

    BOUND = (
        "ttft", "itl", "tpot", "request_tpot", "e2e", "queue_time", "prefill_time", "decode_time",
        "inference_time", "request_prompt_tokens", "request_generation_tokens", "prefill_kv_computed",
        "max_generation_tokens", "params_n", "params_max_tokens", "prompt_tokens", "prompt_tokens_cached",
        "generation_tokens",
    )  # fmt: skip

    def __init__(self, owner: ApiMetrics, model: str, version: str):
        self.labels = (model, version)
        for name in self.BOUND:
            setattr(self, name, getattr(owner, name).labels(model, version))
        self._success = owner._success

    def first_token(self, arrival: float, now: float) -> None:
        self.ttft.observe(max(0.0, now - arrival))

    def tokens_after_gap(self, gap_s: float, num_tokens: int) -> None:
        gap = max(0.0, gap_s / num_tokens)
        for _ in range(num_tokens):
            self.itl.observe(gap)
            self.tpot.observe(gap)

    def finished(
        self,
        arrival: float,
        now: float,
        finish_reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        *,
        timings: RequestTimings | None = None,
        started: RequestTimings | None = None,
        cached_tokens: int = 0,
        first_token_at: float | None = None,
        parent: ParentRequest | None = None,
    ) -> None:
        """One engine request done (each of n choices counts). prompt_tokens: 0 for all but
        one choice of a prompt, as usage counts it (cached_tokens likewise). timings: the
        engine's phases when the scheduler ended the request; started: those known at its
        first token, for a request ended elsewhere (queue and prefill only)."""
        self.e2e.observe(max(0.0, now - arrival))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self._success.labels(*self.labels, finish_reason).inc()
        self.request_generation_tokens.observe(generation_tokens)
        if prompt_tokens:
            self.request_prompt_tokens.observe(prompt_tokens)
            self.prompt_tokens_cached.inc(cached_tokens)
            self.prefill_kv_computed.observe(max(0, prompt_tokens - cached_tokens))
        if first_token_at is not None and generation_tokens > 1:
            self.request_tpot.observe(max(0.0, now - first_token_at) / (generation_tokens - 1))
        if timings is not None:
            self.queue_time.observe(max(0.0, timings.queue_s))
            self.prefill_time.observe(max(0.0, timings.prefill_s))
            self.decode_time.observe(max(0.0, timings.decode_s))
            self.inference_time.observe(max(0.0, timings.inference_s))
        elif started is not None:  # ended outside the scheduler (a stop string): its phases so far
            self.queue_time.observe(max(0.0, started.queue_s))
            self.prefill_time.observe(max(0.0, started.prefill_s))
        if parent is not None:
            if parent.max_tokens > 0:
                self.params_max_tokens.observe(parent.max_tokens)
            parent.most_tokens = max(parent.most_tokens, generation_tokens)
            parent.remaining -= 1
            if parent.remaining == 0:
                self.params_n.observe(parent.n)
                self.max_generation_tokens.observe(parent.most_tokens)
