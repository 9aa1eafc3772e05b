"""Prometheus metrics for GET /metrics, named like vLLM's with the prefix ``zeroserve:`` and
the label ``model_name``.

Two sources, so that N api processes report the truth:
- per-request metrics (TTFT, ITL, e2e, queue time, token and success counters) are measured
  here; with ``metrics_dir`` they live in prometheus_client's multiprocess files and a scrape
  of any api process sums every process' files;
- engine-wide numbers (running / waiting requests, KV usage, preemptions, prefix cache) are
  the engine's own, read from the latest Pong at scrape time by ``EngineStatsCollector``:
  each scrape reports them once, whichever process answers. They carry a ``replica`` label
  (``r0`` ... with ``--data-parallel-size``): each replica has its own queue and KV pool. The
  routers' numbers (decisions per replica and reason, matched prefix blocks per decision, the
  time a decision takes, failovers) come the same way, from every tokenizer's latest Pong,
  summed over the tokenizers (each routes its own share of the requests).

request_queue_time_seconds is approximate: the time from the API receiving a request to the
engine's first message about it. The engine sends that message with the first token, so it
is an upper bound (it includes the prefill), equal to TTFT unless the engine reports earlier.
ITL: a delta carrying k tokens after a gap g counts as k intervals of g / k.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from zeroserve.shared.messages import BucketCounts, EngineStatus, RouterStats

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
LABELS = ["model_name"]

TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
ITL_BUCKETS = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
LATENCY_BUCKETS = [
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]

# SchedulerStats field -> (metric name, help, kind)
ENGINE_STATS = {
    "num_running": ("zeroserve:num_requests_running", "Requests the engine is running now.", "gauge"),
    "num_waiting": ("zeroserve:num_requests_waiting", "Requests waiting in the engine's queue.", "gauge"),
    "kv_cache_usage": ("zeroserve:kv_cache_usage_perc", "KV-cache usage, 1 = full.", "gauge"),
    "num_preemptions": ("zeroserve:num_preemptions", "Preemptions since the engine started.", "counter"),
    "prefix_cache_queries": (
        "zeroserve:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        "counter",
    ),
    "prefix_cache_hits": (
        "zeroserve:prefix_cache_hits",
        "Prompt tokens found in the prefix cache.",
        "counter",
    ),
    "num_steps_over_target": (
        "zeroserve:steps_over_itl_target",
        "Steps whose decodes alone were predicted past --target-itl-ms (prefills got the minimum share).",
        "counter",
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


class EngineStatsCollector:
    """Engine-wide gauges and counters per replica from the latest Pong, and the routers'
    counters from every tokenizer's, read at scrape time."""

    def __init__(
        self,
        model_name: str,
        engine: Callable[[], EngineStatus | None],
        routers: Callable[[], list[RouterStats]] = list,
    ):
        self.model_name = model_name
        self.engine = engine
        self.routers = routers

    def collect(self):
        engine = self.engine()
        if engine is not None:  # else not reported yet: absent rather than made-up zeros
            # a tokenizer that lists no replicas (one fixed scheduler, an older one) reports r0
            replicas = [(r.replica_id, r.stats) for r in engine.replicas] or [("r0", engine.stats)]
            for field, (name, doc, kind) in ENGINE_STATS.items():
                family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                    name, doc, labels=[*LABELS, "replica"]
                )
                for replica_id, stats in replicas:
                    family.add_metric([self.model_name, replica_id], float(getattr(stats, field)))
                yield family
        routers = self.routers()
        if routers:
            yield from self.router_families(routers)

    def router_families(self, routers: list[RouterStats]):
        decisions: dict[tuple[str, str], int] = {}
        for router in routers:
            for d in router.decisions:
                decisions[(d.replica_id, d.reason)] = decisions.get((d.replica_id, d.reason), 0) + d.count
        family = CounterMetricFamily(
            "zeroserve:router_requests",
            "Routing decisions, by the replica chosen and why (prefix, load, balance, session, "
            "round_robin, least_loaded).",
            labels=[*LABELS, "replica", "reason"],
        )
        for (replica_id, reason), count in sorted(decisions.items()):
            family.add_metric([self.model_name, replica_id, reason], float(count))
        yield family
        failovers = CounterMetricFamily(
            "zeroserve:router_failovers",
            "Requests re-sent to another replica after theirs failed before their first token.",
            labels=LABELS,
        )
        failovers.add_metric([self.model_name], float(sum(r.failovers for r in routers)))
        yield failovers
        yield self.histogram(
            "zeroserve:router_matched_prefix_blocks",
            "Leading KV blocks of the prompt the chosen replica held, per routing decision.",
            [r.matched_blocks for r in routers],
        )
        yield self.histogram(
            "zeroserve:router_decision_time_seconds",
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
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        family.add_metric([self.model_name], buckets, sum_value=total)
        return family


class ApiMetrics:
    def __init__(
        self,
        model_name: str,
        engine: Callable[[], EngineStatus | None],
        metrics_dir: str | None = None,
        routers: Callable[[], list[RouterStats]] = list,
    ):
        self.model_name = model_name
        self.metrics_dir = metrics_dir
        self.engine_stats = EngineStatsCollector(model_name, engine, routers)
        if metrics_dir is not None:
            enable_multiprocess(metrics_dir)
            self.registry = None  # values live in the files; a scrape builds a registry over them
        else:
            self.registry = CollectorRegistry()
            self.registry.register(self.engine_stats)
        reg = self.registry

        def histogram(name: str, doc: str, buckets: list[float]):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(name, doc, LABELS, registry=reg).labels(model_name)

        self.ttft = histogram("zeroserve:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram(
            "zeroserve:inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "zeroserve:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "zeroserve:request_queue_time_seconds",
            "Arrival to the engine's first message (upper bound of queueing).",
            LATENCY_BUCKETS,
        )
        self.prompt_tokens = counter("zeroserve:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("zeroserve:generation_tokens", "Tokens generated.")
        self._success = Counter(
            "zeroserve:request_success",
            "Requests finished, by finish reason.",
            [*LABELS, "finished_reason"],
            registry=reg,
        )

    # ------------------------------------------------------------------ recording

    def first_message(self, arrival: float, now: float) -> None:
        self.queue_time.observe(max(0.0, now - arrival))

    def first_token(self, arrival: float, now: float) -> None:
        self.ttft.observe(max(0.0, now - arrival))

    def tokens_after_gap(self, gap_s: float, num_tokens: int) -> None:
        for _ in range(num_tokens):
            self.itl.observe(max(0.0, gap_s / num_tokens))

    def finished(
        self, arrival: float, now: float, finish_reason: str, prompt_tokens: int, generation_tokens: int
    ) -> None:
        """One engine request done (each of n choices counts). prompt_tokens: 0 for all but
        one choice of a prompt, as usage counts it."""
        self.e2e.observe(max(0.0, now - arrival))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self._success.labels(self.model_name, finish_reason).inc()

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        if self.metrics_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        registry.register(self.engine_stats)
        return generate_latest(registry)
