"""CPU graphs against eager decode steps, side by side in one run: the same model, weights
and batches in two ModelRunners, one replaying recorded kernel calls (the default), one with
--enforce-eager; their decode steps are timed in alternation so that the machine's drift
falls on both.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cpu_graphs.py --quantization q4
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cpu_graphs.py --quantization int8 --batches 1,64

Prints milliseconds per decode step (median of --steps, after the graph of each batch size is
recorded and checked) at context --context, and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from zeroserve.shared import env as _env  # noqa: E402  (no torch: sets OpenMP's env before torch loads it)

_env.set_cpu_thread_env()

import torch  # noqa: E402

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.shared.messages import NewRequestData, RunningRequestData, SamplingParams, StepPlan  # noqa: E402
from zeroserve.shared.model_files import resolve_model  # noqa: E402

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


def start(runner: ModelRunner, batch: int, context: int, steps: int) -> list[RunningRequestData]:
    """`batch` sequences at `context - 1` cached tokens, their first decode step run."""
    per_seq = -(-(context + steps + 4) // runner.block_size)
    new = [
        NewRequestData(
            f"b{batch}-{i}",
            [(7 * i + j) % 1000 + 3 for j in range(context)],
            list(range(i * per_seq, (i + 1) * per_seq)),
            context - 1,
            1,
            GREEDY,
        )
        for i in range(batch)
    ]
    runner.execute(StepPlan(0, new=new))
    running = [RunningRequestData(r.request_id, [], 1) for r in new]
    for s in range(2):  # (a graph recorded at its first step is checked at its second)
        runner.execute(StepPlan(1 + s, running=running))
    return running


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the packaged SmolLM2)")
    p.add_argument("--quantization", default="q4", choices=["none", "int8", "q4", "bf16"])
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    per_seq = -(-(args.context + args.steps * 2 + 8) // 16)
    runners = {}
    for name, eager in (("graphs", False), ("eager", True)):
        runners[name] = ModelRunner(
            RunnerConfig(
                model=resolve_model(args.model),
                load_format="auto",
                num_kv_blocks=max(batches) * per_seq,
                max_model_len=args.context + args.steps * 2 + 8,
                max_num_seqs=max(batches),
                quantization="none" if args.quantization == "bf16" else args.quantization,
                dtype="bfloat16" if args.quantization == "bf16" else "auto",
                enforce_eager=eager,
            )
        )
    print(
        f"# {runners['graphs'].quantization_summary}; {runners['graphs'].graphs_summary}; "
        f"{torch.get_num_threads()} threads, context {args.context}",
        file=sys.stderr,
    )
    print("| batch | eager ms/step | CPU graphs ms/step | speed-up | graph tok/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch in batches:
        running = {name: start(r, batch, args.context, args.steps) for name, r in runners.items()}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for s in range(args.steps):
            for name, r in runners.items():  # alternate: drift falls on both
                t = time.perf_counter()
                r.execute(StepPlan(10 + s, running=running[name]))
                times[name].append(time.perf_counter() - t)
        for name, r in runners.items():
            r.execute(StepPlan(10 + args.steps, finished_ids=[x.request_id for x in running[name]]))
        eager, graphs = (statistics.median(times[n]) for n in ("eager", "graphs"))
        print(
            f"| {batch} | {eager * 1e3:.2f} | {graphs * 1e3:.2f} | {eager / graphs:.2f}x | {batch / graphs:.1f} |",
            flush=True,
        )
    replays = runners["graphs"].forward.replays
    print(f"# graph replays: {replays} (every timed step: {args.steps * len(batches)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
