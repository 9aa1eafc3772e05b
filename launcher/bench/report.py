"""The summary table on stdout and the JSON file.

`bench serve` JSON (schema "zeroserve-bench-serve/1"); times in ms, throughputs per second:
    schema, date, base_url, model, tokenizer, num_requests
    config            every option of the run (api key left out; request_rate null = infinite)
    fields_sent       optional fields the server took: ignore_eos, min_tokens, stream_options
    fields_dropped    those it refused (400/422), dropped with a warning
    completed, failed, errors {type: count}   types: http_<status>, stream_broken,
                      stream_error, bad_chunk, timeout, connection, empty_response
    duration_s, total_input_tokens, total_output_tokens
    request_throughput, output_throughput, total_token_throughput, mean_concurrency
    goodput (req/s meeting every SLO), goodput_fraction   null without --goodput
    prefix_cache_hit_rate   prompt tokens found in the server's prefix cache / looked up, over
                      the timed requests (from zeroserve's /metrics; null for other servers)
    usage_reported    successful requests whose token counts came from the server's usage
    output_len_mismatch   successful requests whose output length differs from the asked one
    {mean,median,std,min,max,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms   (percentiles as asked)
    warnings          what was printed as a warning
    per_request       [{start_s, success, error, error_detail, prompt_tokens, output_tokens,
                        expected_output_len, ttft_ms, tpot_ms, e2el_ms, itl_ms: [...]}]

`bench sweep` JSON (schema "zeroserve-bench-sweep/1"):
    schema, date, concurrency [..], config, targets: [{name, base_url, model, error,
    runs: [serve JSON without per_request, one per concurrency, with "concurrency"]}]
"""

from __future__ import annotations

import json
import os

from zeroserve.launcher.bench.metrics import METRICS, pct_key

_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_summary(result: dict) -> str:
    """A vLLM-style block of `label: value` lines, one section per latency metric."""
    cfg = result.get("config", {})
    width = 52
    rows: list[str] = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=width, c="=")]

    def row(label: str, value, digits: int = 2) -> None:
        rows.append(f"{label:<38}{_fmt(value, digits):>14}")

    row("Server:", result.get("base_url"))
    row("Model:", result.get("model"))
    row("Endpoint / dataset:", f"{cfg.get('endpoint')} / {cfg.get('dataset')}")
    row("Max concurrency:", cfg.get("max_concurrency") or "inf")
    row("Request rate (req/s):", cfg.get("request_rate") or "inf")
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    for kind, n in result["errors"].items():
        row(f"  {kind}:", n)
    row("Benchmark duration (s):", result["duration_s"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    row("Mean concurrency:", result["mean_concurrency"])
    if result.get("prefix_cache_hit_rate") is not None:
        row("Prefix cache hit rate (server, %):", 100.0 * result["prefix_cache_hit_rate"])
    if result.get("goodput") is not None:
        row("Goodput (req/s):", result["goodput"])
        row("Requests within SLOs (%):", 100.0 * result["goodput_fraction"])
    for name in METRICS:
        rows.append("{s:{c}^{n}}".format(s=f" {_TITLES[name]} ", n=width, c="-"))
        row(f"Mean {name.upper()} (ms):", result[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", result[f"median_{name}_ms"])
        for p in cfg.get("percentiles", (90, 99)):
            if p != 50:
                row(f"P{p:g} {name.upper()} (ms):", result[f"{pct_key(p)}_{name}_ms"])
    if result.get("fields_dropped"):
        rows.append(f"Dropped fields the server refused: {', '.join(result['fields_dropped'])}")
    rows.append("=" * width)
    return "\n".join(rows)


def format_sweep(sweep: dict) -> str:
    """One line per (target, concurrency): throughputs and tail latencies side by side."""
    head = f"{'target':<14}{'conc':>6}{'ok':>6}{'err':>5}{'req/s':>9}{'out tok/s':>11}{'p99 TTFT':>10}{'p99 ITL':>9}{'p99 E2EL':>10}"
    lines = [head, "-" * len(head)]
    for target in sweep["targets"]:
        if target.get("error"):
            lines.append(f"{target['name']:<14}  failed: {target['error']}")
        for run in target["runs"]:
            lines.append(
                f"{target['name']:<14}{run['concurrency']:>6}{run['completed']:>6}{run['failed']:>5}"
                f"{_fmt(run['request_throughput']):>9}{_fmt(run['output_throughput'], 1):>11}"
                f"{_fmt(run.get('p99_ttft_ms'), 1):>10}{_fmt(run.get('p99_itl_ms'), 1):>9}{_fmt(run.get('p99_e2el_ms'), 1):>10}"
            )
    return "\n".join(lines)


def write_json(path: str, obj: dict) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
