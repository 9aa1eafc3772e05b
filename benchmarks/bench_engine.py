"""The cost of the process hops: tokens/s through the full process chain vs the in-process engine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_engine.py [--batches 1,64] [--output-len 128]

Same model (the packaged SmolLM2 GGUF unless --model), same scheduler and runner settings,
same prompts (token ids), greedy with ignore_eos so every request decodes exactly
--output-len tokens. In-process: Scheduler + ModelRunner in this process. Chain: `zeroserve
serve --api-workers 0` (worker, scheduler, tokenizer processes) driven by the ZMQ client.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from zeroserve.shared import env as _env  # noqa: E402  (no torch: sets OpenMP's env before torch loads it)

_env.set_cpu_thread_env()  # as the worker process does: PASSIVE threads after a short spin


def prompts_for(batch: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(batch)]


def bench_in_process(
    model: str, batches: list[int], input_len: int, output_len: int, threads: int
) -> dict[int, float]:
    import torch

    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.shared.messages import SamplingParams

    torch.set_num_threads(threads)
    runner = ModelRunner(RunnerConfig(model=model, max_model_len=2048, num_kv_blocks=4096, max_num_seqs=128))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    out = {}
    for batch in batches:
        engine = InProcessEngine(runner)
        engine.generate(
            prompts_for(2, 8, runner.vocab_size, 99), SamplingParams(temperature=0, max_tokens=4)
        )  # warm-up
        prompts = prompts_for(batch, input_len, runner.vocab_size)
        start = time.perf_counter()
        results = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
        assert all(len(r) == output_len for r in results)
        out[batch] = batch * output_len / elapsed
        print(f"in-process batch {batch}: {out[batch]:.1f} tok/s", file=sys.stderr)
    del runner
    return out


def bench_chain(
    model: str, batches: list[int], input_len: int, output_len: int, threads: int, vocab: int
) -> dict[int, float]:
    from zeroserve.shared.client import EngineClient
    from zeroserve.shared.messages import SamplingParams

    run_dir = tempfile.mkdtemp(prefix="zs-bench-")
    env = dict(os.environ, ZEROSERVE_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        "-m",
        "zeroserve.launcher.cli",
        "serve",
        model,
        "--api-workers",
        "0",
        "--run-dir",
        run_dir,
        "--max-model-len",
        "2048",
        "--num-kv-blocks",
        "4096",
        "--max-num-seqs",
        "128",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def main() -> dict[int, float]:
        out = {}
        async with EngineClient(f"ipc://{run_dir}/tokenizer-0.sock") as client:
            await client.wait_ready(300)
            await client.complete(
                prompt_token_ids=prompts_for(1, 8, vocab, 99)[0],
                params=SamplingParams(temperature=0, max_tokens=4),
            )
            for batch in batches:
                jobs = [
                    {"prompt_token_ids": p, "params": params} for p in prompts_for(batch, input_len, vocab)
                ]
                start = time.perf_counter()
                n = 0
                async for _, res in client.generate_many(jobs, max_concurrency=batch):
                    n += len(res["token_ids"])
                elapsed = time.perf_counter() - start
                assert n == batch * output_len, n
                out[batch] = n / elapsed
                print(f"process chain batch {batch}: {out[batch]:.1f} tok/s", file=sys.stderr)
        return out

    try:
        return asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    from zeroserve.gpu_worker.loader import load_model_config
    from zeroserve.shared.model_files import resolve_model

    model = resolve_model(args.model)
    vocab = load_model_config(model).vocab_size
    batches = [int(b) for b in args.batches.split(",")]
    inproc = bench_in_process(model, batches, args.input_len, args.output_len, args.threads)
    chain = bench_chain(model, batches, args.input_len, args.output_len, args.threads, vocab)
    print(
        f"\nprompt {args.input_len} tokens, {args.output_len} output tokens each, greedy, {args.threads} torch threads\n"
    )
    print("| batch | in-process tok/s | process chain tok/s | chain / in-process |")
    print("|---:|---:|---:|---:|")
    for b in batches:
        print(f"| {b} | {inproc[b]:.1f} | {chain[b]:.1f} | {chain[b] / inproc[b]:.3f} |")


if __name__ == "__main__":
    main()
