"""Scheduler overhead per step: schedule() + update_from_output() with 256 running and 1,000
waiting requests, no model (a trivial executor answers each plan). Target: well under 1 ms.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scheduler.py [--steps 2000]

Two workloads, both keeping 1,000 requests waiting (topped up outside the timed region):
  decode:  256 running requests that never finish -> every step is 256 decodes.
  mixed:   requests finish after 32..256 tokens and waiting ones are admitted in their place,
           so steps mix decodes, chunked prefills, finishes, prefix hits on a shared
           64-token system prompt, and block allocation.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np

from zeroserve.scheduler_proc.scheduler import Scheduler, SchedulerConfig
from zeroserve.shared.messages import EngineRequest, SamplingParams, StepPlan, StepResult


class TrivialExecutor:
    """Tracks (known tokens, computed tokens) per request; token = f(request, position)."""

    def __init__(self) -> None:
        self.state: dict[str, list[int]] = {}  # id -> [num_tokens, num_computed]

    def run(self, plan: StepPlan) -> StepResult:
        state = self.state
        for rid in plan.finished_ids:
            state.pop(rid, None)
        ids, tokens = [], []
        for n in plan.new:
            st = state[n.request_id] = [len(n.token_ids), n.num_computed_tokens + n.num_new_tokens]
            if st[1] == st[0]:
                ids.append(n.request_id)
                tokens.append(100 + st[0] % 30_000)
                st[0] += 1
        for r in plan.running:
            st = state[r.request_id]
            st[1] += r.num_new_tokens
            if st[1] == st[0]:
                ids.append(r.request_id)
                tokens.append(100 + st[0] % 30_000)
                st[0] += 1
        return StepResult(plan.step_id, ids, tokens)


def run(workload: str, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = random.Random(seed)
    cfg = SchedulerConfig(num_blocks=40_000, block_size=16, max_num_seqs=256, max_num_batched_tokens=2048,
                          max_model_len=8192, eos_token_ids=(2,))  # fmt: skip
    sched, executor = Scheduler(cfg), TrivialExecutor()
    system_prompt = [rng.randrange(100, 30_000) for _ in range(64)]
    counter = 0

    def add_one() -> None:
        nonlocal counter
        prompt = system_prompt + [rng.randrange(100, 30_000) for _ in range(rng.randrange(64, 448))]
        max_tokens = 4096 if workload == "decode" else rng.randrange(32, 256)
        sched.add_request(EngineRequest(f"req-{counter}", prompt, SamplingParams(max_tokens=max_tokens),
                                        arrival_time=time.time(), priority=rng.randrange(0, 3)))  # fmt: skip
        counter += 1

    def top_up() -> None:
        while len(sched.waiting) < 1000:
            add_one()

    for _ in range(256 + 1000):
        add_one()
    while len(sched.running) < 256:  # warm up: prefill until the batch is full
        sched.update_from_output(executor.run(sched.schedule()))
        top_up()
    wall_s, wall_u, cpu, n_tokens, n_running = [], [], [], [], []
    wall, thread_cpu = time.perf_counter_ns, time.thread_time_ns
    for _ in range(steps):
        c0, t0 = thread_cpu(), wall()
        plan = sched.schedule()
        t1, c1 = wall(), thread_cpu()
        result = executor.run(plan)
        c2, t2 = thread_cpu(), wall()
        sched.update_from_output(result)
        t3, c3 = wall(), thread_cpu()
        wall_s.append(t1 - t0)
        wall_u.append(t3 - t2)
        cpu.append((c1 - c0) + (c3 - c2))
        n_tokens.append(sched.tokens_scheduled_last_step)
        n_running.append(len(sched.running))
        top_up()
    s, u = np.array(wall_s) / 1e3, np.array(wall_u) / 1e3
    return {"schedule": s, "update": u, "total": s + u, "total cpu": np.array(cpu) / 1e3,
            "tokens": np.array(n_tokens), "running": np.array(n_running)}  # fmt: skip


def python_speed_ms() -> float:
    """A fixed pure-Python loop, to compare machines (and moods of a shared VM): best of 5."""
    best = float("inf")
    for _ in range(5):
        t0, x = time.thread_time_ns(), 0
        for i in range(1_000_000):
            x += i
        best = min(best, (time.thread_time_ns() - t0) / 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python speed: a 1M-iteration loop takes {python_speed_ms():.1f} ms; load average {load:.2f}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("wall-clock per step (schedule, update, total) and the thread's CPU time (total cpu: not")
    print("counting time the OS gave other processes; the honest number on a shared machine)")
    print(f"{'workload':8} {'part':9} {'mean us':>8} {'p50 us':>8} {'p99 us':>8}   context")
    for workload in ("decode", "mixed"):
        r = run(workload, args.steps)
        ctx = (f"{r['running'].mean():.0f} running, 1000 waiting, "
               f"{r['tokens'].mean():.0f} tokens/step, {args.steps} steps")  # fmt: skip
        for part in ("schedule", "update", "total", "total cpu"):
            v = r[part]
            print(f"{workload:8} {part:9} {v.mean():8.1f} {np.percentile(v, 50):8.1f} "
                  f"{np.percentile(v, 99):8.1f}   {ctx if part == 'total cpu' else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
