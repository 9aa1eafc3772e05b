"""Benchmark maths: percentiles, TTFT / TPOT / ITL / E2EL statistics, throughput, goodput.

Definitions (the ones vLLM's serving benchmark uses, so figures compare):
    TTFT  time from sending a request to its first chunk with text.
    TPOT  per request: (E2EL - TTFT) / (output_tokens - 1); undefined for one output token.
    ITL   every gap between two consecutive text chunks, pooled over all requests.
    E2EL  time from sending a request to the end of its stream.
    goodput  requests per second that met every SLO given (TTFT, TPOT, ITL, E2EL, in ms), as
             DistServe measures serving; a request with one output token has no TPOT and meets
             any TPOT SLO. The ITL SLO bounds every gap of the request (its longest stall, what
             a reader of the stream notices), not a mean: one gap over it fails the request.
Throughputs divide by the benchmark's wall time (first send to last completion, warm-up
excluded). Failed requests count in `errors` and nowhere else.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from zeroserve.launcher.bench.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_NAMES = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default):
    rank = p/100 * (n-1), interpolated between its floor and ceiling."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside [0, 100]")
    rank = p / 100 * (len(xs) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def pct_key(p: float) -> str:
    """90 -> 'p90', 99.9 -> 'p99.9'."""
    return f"p{p:g}"


def stats_ms(name: str, values_s: list[float], percentiles: Iterable[float]) -> dict:
    """mean/median/std/min/max and percentiles of seconds, as `{stat}_{name}_ms` keys (None
    when there are no values, e.g. no request succeeded)."""
    ps = list(percentiles)
    keys = ["mean", "median", "std", "min", "max"] + [pct_key(p) for p in ps]
    if not values_s:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    out = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)),
        f"min_{name}_ms": min(ms),
        f"max_{name}_ms": max(ms),
    }
    out.update({f"{pct_key(p)}_{name}_ms": percentile(ms, p) for p in ps})
    return out


def tpot(res: RequestResult) -> float | None:
    """Seconds per output token after the first; None with fewer than two output tokens."""
    if res.output_tokens < 2:
        return None
    return (res.latency - res.ttft) / (res.output_tokens - 1)


def parse_goodput(spec: str | None) -> dict[str, float]:
    """'ttft:200,tpot:50,e2el:2000' -> {'ttft': 200.0, ...} (milliseconds)."""
    if not spec:
        return {}
    slos: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"bad --goodput item {part!r}: use NAME:MS with NAME in {', '.join(SLO_NAMES)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad --goodput value {value!r} for {name}: a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"--goodput {name} must be positive, got {ms}")
        slos[name] = ms
    return slos


def meets_slos(res: RequestResult, slos: dict[str, float]) -> bool:
    if not res.success:
        return False
    t = tpot(res)
    measured = {
        "ttft": res.ttft * 1000,
        "tpot": (t or 0.0) * 1000,
        "itl": max(res.itl, default=0.0) * 1000,
        "e2el": res.latency * 1000,
    }
    return all(measured[name] <= limit for name, limit in slos.items())


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    percentiles: Iterable[float] = (50, 90, 99),
    slos: dict | None = None,
) -> dict:
    """Every figure of one run, as a flat dict of JSON-ready values."""
    ps = list(percentiles)
    ok = [r for r in results if r.success]
    errors = Counter(r.error or "unknown" for r in results if not r.success)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.expected_prompt_len for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    usage_n = sum(r.usage_reported for r in ok)
    duration = max(duration_s, 1e-9)
    m: dict = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "mean_concurrency": sum(r.latency for r in ok) / duration,
        # How many successful requests carried the server's usage (else tokens were counted
        # as text chunks) and how many got a different length from the one asked for.
        "usage_reported": usage_n,
        "output_len_mismatch": sum(
            r.output_tokens != r.expected_output_len for r in ok if r.expected_output_len
        ),
    }
    m.update(stats_ms("ttft", [r.ttft for r in ok], ps))
    m.update(stats_ms("tpot", [t for r in ok if (t := tpot(r)) is not None], ps))
    m.update(stats_ms("itl", [gap for r in ok for gap in r.itl], ps))
    m.update(stats_ms("e2el", [r.latency for r in ok], ps))
    if slos:
        good = sum(meets_slos(r, slos) for r in results)
        m["goodput"] = good / duration
        m["goodput_fraction"] = good / len(results) if results else 0.0
    else:
        m["goodput"] = m["goodput_fraction"] = None
    return m
