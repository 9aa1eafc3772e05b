"""The fixed token budget against ``--target-itl-ms`` on the real stack, side by side in one run.

Starts ``zeroserve serve`` once per setting (one server at a time, so none steals the others'
cores), runs ``zeroserve bench serve`` against it at one concurrency, reads the scheduler's
``steps_over_itl_target`` counter and the step cost model's fit error (the mean relative error
of its predictions of steps not yet learned), stops it, and prints one table: ITL p50/p99, TTFT
p50/p99, output tok/s and goodput (requests per second meeting every SLO; ``itl`` bounds each
gap); then each target against the fixed budget of its own round, by the issue's bounds.
Rounds rotate the order of the settings, so a change in the machine's load hits each of them.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_itl_target.py \\
        --targets 0,160,175 --rounds 3 [--mixed]

``0`` is today's fixed budget (``--max-num-batched-tokens``). ``--mixed`` makes every 8th prompt
1,500 tokens (the rest --input-len) from random words sized with the served model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import urllib.request

from bench_peers import stop, wait_ready  # this folder: the one way the benchmarks start and stop servers


def scrape(url: str, name: str) -> float:
    """Sum of every sample of the metric ``name`` (any labels) in /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def mixed_dataset(path: str, num: int, short_len: int) -> None:
    from zeroserve.launcher.bench.datasets import load_counter, text_of_length
    from zeroserve.shared.model_files import resolve_model

    counter = load_counter(resolve_model(None))  # the served model's tokenizer
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(num):
            text, _ = text_of_length(1500 if i % 8 == 7 else short_len, counter, rng)
            f.write(json.dumps({"prompt": text}) + "\n")


def run_one(args: argparse.Namespace, target: float, dataset: list[str], workdir: str) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "zeroserve.launcher.cli", "serve", "--port", str(args.port)]
    cmd += ["--max-model-len", "2048", "--run-dir", os.path.join(workdir, f"run-{target:g}")]
    cmd += ["--target-itl-ms", f"{target:g}"]  # 0 too: the fixed budget whatever the default
    log = open(os.path.join(workdir, f"serve-{target:g}.log"), "w")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        if not wait_ready(url, "/ready", proc, 300.0):
            raise RuntimeError(f"the server was not ready (exit code {proc.poll()}); see {log.name}")
        out_json = os.path.join(workdir, f"bench-{target:g}.json")
        bench = [sys.executable, "-m", "zeroserve.launcher.cli", "bench", "serve", "--base-url", url]
        bench += ["--max-concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts)]
        bench += ["--output-len", str(args.output_len), "--goodput", args.goodput, "--seed", "0"]
        bench += [*dataset, "--output-json", out_json, "--disable-tqdm"]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL, env=env)
        with open(out_json) as f:
            result = json.load(f)
        result["steps_over_target"] = scrape(url, "zeroserve:steps_over_itl_target_total")
        # mean relative error of the cost model's predictions of steps it had not yet learned
        result["fit_error"] = scrape(url, "zeroserve:step_cost_model_error")
        return result
    finally:
        stop(proc)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="0,175", help="ms, comma-separated; 0 = the fixed budget")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--mixed", action="store_true", help="every 8th prompt 1,500 tokens")
    p.add_argument("--goodput", default="ttft:10000,itl:500")
    p.add_argument("--port", type=int, default=8419)
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench_itl_")
    if args.mixed:
        path = os.path.join(workdir, "mixed.jsonl")
        mixed_dataset(path, args.num_prompts, args.input_len)
        dataset = ["--dataset", f"jsonl:{path}"]
    else:
        dataset = ["--input-len", str(args.input_len)]
    rows = []
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for target in order:
            print(
                f"round {rnd + 1}: {'fixed budget' if not target else f'--target-itl-ms {target:g}'}",
                flush=True,
            )
            rows.append((rnd + 1, target, run_one(args, target, dataset, workdir)))
    print(f"\nC={args.concurrency}, {args.num_prompts} prompts, goodput SLO {args.goodput}"
          f"{', mixed (every 8th prompt 1,500 tokens)' if args.mixed else f', {args.input_len}-token prompts'}")  # fmt: skip
    print("| round | config | ITL p50 ms | ITL p99 ms | p99 / p50 | TTFT p50 ms | TTFT p99 ms "
          "| output tok/s | goodput req/s | steps over target | model fit error |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rnd, target, r in rows:
        name = "fixed budget (2048 tokens)" if not target else f"--target-itl-ms {target:g}"
        p50, p99 = r["median_itl_ms"], r["p99_itl_ms"]
        print(
            f"| {rnd} | {name} | {p50:.0f} | {p99:.0f} | {p99 / p50:.1f}x | {r['median_ttft_ms']:.0f} "
            f"| {r['p99_ttft_ms']:.0f} | {r['output_throughput']:.1f} | {r['goodput']:.2f} "
            f"| {r['steps_over_target']:.0f} | {r['fit_error']:.1%} |"
        )
    summarize(rows)
    print(f"\nlogs and JSON: {workdir}")


# the bounds, each against the fixed budget of the same round
BOUNDS = (
    ("ITL p99 / p50", lambda r, f: r["p99_itl_ms"] / r["median_itl_ms"], "<=", 3.0),
    ("ITL p99 / fixed's", lambda r, f: r["p99_itl_ms"] / f["p99_itl_ms"], "<=", 0.25),
    ("output tok/s / fixed's", lambda r, f: r["output_throughput"] / f["output_throughput"], ">=", 0.90),
    ("TTFT p99 / fixed's", lambda r, f: r["p99_ttft_ms"] / f["p99_ttft_ms"], "<=", 1.20),
    ("goodput / fixed's", lambda r, f: r["goodput"] / max(f["goodput"], 1e-9), ">", 1.0),
)


def summarize(rows: list[tuple[int, float, dict]]) -> None:
    """Each target against the fixed budget of its own round (the VM's speed drifts between
    rounds more than these settings differ), per round and as the median over rounds."""
    fixed = {rnd: r for rnd, target, r in rows if not target}
    targets = sorted({target for _, target, _ in rows if target})
    if not fixed or not targets:
        return
    print("\nAgainst the fixed budget of the same round (median over rounds; per round in brackets):")
    print("| config | " + " | ".join(f"{name} ({op} {bound:g})" for name, _, op, bound in BOUNDS) + " |")
    print("|---|" + "---:|" * len(BOUNDS))
    for target in targets:
        cells = []
        for _name, ratio, op, bound in BOUNDS:
            values = [ratio(r, fixed[rnd]) for rnd, t, r in rows if t == target and rnd in fixed]
            mid = statistics.median(values)
            ok = {"<=": mid <= bound, ">=": mid >= bound, ">": mid > bound}[op]
            each = ", ".join(f"{v:.2f}" for v in values)
            cells.append(f"{mid:.2f} {'met' if ok else 'MISSED'} [{each}]")
        print(f"| --target-itl-ms {target:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
