"""End-to-end decode tokens/s: zeroserve's ModelRunner (eager and CUDA graphs) beside HF generate.

    python benchmarks/gpu/bench_e2e.py [--device cuda] [--tiny] [--batches 1,32,256] [--out DIR]

Llama-3-8B shape (benchmarks/configs/llama-3-8b) with random weights, bf16, on one GPU.
Every request has the same random ``--input-len`` prompt length and decodes greedily with
ignore_eos, scheduled by the real scheduler in-process; only steps where the whole batch
decodes are timed (after ``--warmup-steps``), each as the runner's step time (wall time
inside ``runner.execute``; the sampled ids come back to the host, so a step is complete
when it returns). Hugging Face: ``generate`` of 1 and of 1 + output_len
new tokens, the difference divided out, so its prefill is not counted either.

CUDA graphs: if the ModelRunner captures graphs itself (``enforce_eager=False`` replaced
``runner.forward``), those are used; otherwise gpu_worker/cuda_graphs.DecodeGraphs wraps
``runner.model.forward`` here. Writes ``bench_e2e.json``.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, parse_args, print_table, setup_device, sync  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA3_8B = os.path.join(REPO, "benchmarks", "configs", "llama-3-8b")


def extra_args(parser) -> None:
    parser.add_argument("--config", default=LLAMA3_8B, help="folder with a config.json")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kernels", default=None, help="torch | triton (default: by device)")
    parser.add_argument("--skip-hf", action="store_true")


def tiny_config_dir() -> str:
    """A 2-layer Llama config with Llama-3's rope scaling, for CPU dry runs."""
    with open(os.path.join(LLAMA3_8B, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=256)
    folder = tempfile.mkdtemp(prefix="zeroserve-tiny-llama-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(batch)]


# --------------------------------------------------------------------------- Hugging Face


def bench_hf(args, config_dir, batches, dtype, rows) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    t0 = time.perf_counter()
    with torch.device(args.device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.eval()
    print(f"HF model built in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        for batch in batches:
            ids = torch.tensor(prompts(batch, args.input_len, config.vocab_size), device=args.device)
            mask = torch.ones_like(ids)

            def generate(n, model=model, ids=ids, mask=mask):
                sync(args.device)
                start = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0,
                    )
                sync(args.device)
                assert out.shape[1] == args.input_len + n, out.shape
                return time.perf_counter() - start

            generate(2)  # warm up (kernels, allocator)
            prefill = generate(1)
            full = generate(1 + args.output_len)
            decode_s = max(full - prefill, 1e-9)
            rows.append(
                {
                    "engine": "hf generate",
                    "batch": batch,
                    "tok/s": batch * args.output_len / decode_s,
                    "ms/step": 1e3 * decode_s / args.output_len,
                }
            )
            print(rows[-1], flush=True)
    finally:
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- zeroserve


def decode_run(runner, batch: int, args) -> dict:
    """Prefill ``batch`` prompts, then time decode steps of the whole batch."""
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.shared.messages import SamplingParams

    engine = InProcessEngine(runner, max_num_seqs=batch, max_num_batched_tokens=max(2048, args.input_len))
    params = SamplingParams(
        max_tokens=args.warmup_steps + args.output_len + 1, temperature=0.0, ignore_eos=True
    )
    step_times = []

    def time_decodes(step) -> None:
        plan = step.plan
        if not plan.new and len(plan.running) == batch and all(r.num_new_tokens == 1 for r in plan.running):
            step_times.append(step.result.step_time_s)

    engine.generate(
        prompts(batch, args.input_len, runner.vocab_size, seed=batch), params, on_step=time_decodes
    )
    timed = step_times[args.warmup_steps :][: args.output_len]
    if not timed:
        raise RuntimeError(f"no decode steps were timed (got {len(step_times)} decode steps)")
    total = sum(timed)
    timed_sorted = sorted(timed)
    return {
        "batch": batch,
        "tok/s": batch * len(timed) / total,
        "ms/step": 1e3 * total / len(timed),
        "p50 ms": 1e3 * timed_sorted[len(timed) // 2],
        "steps": len(timed),
    }


def bench_zeroserve(args, config_dir, batches, report) -> None:
    import torch

    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig

    kernels = args.kernels or ("triton" if args.device == "cuda" else "torch")
    t0 = time.perf_counter()
    runner = ModelRunner(
        RunnerConfig(
            model=config_dir,
            load_format="dummy",
            device=args.device,
            max_model_len=args.max_model_len,
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(2048, args.input_len),
            kernel_backend=kernels,
            enforce_eager=False,
            gpu_memory_utilization=0.85,
        )
    )
    eager_forward = runner.model.forward
    native_graphs = runner.forward != eager_forward
    report.data["runner"] = {
        "load_s": round(time.perf_counter() - t0, 1),
        "kernels": kernels,
        "num_kv_blocks": runner.num_kv_blocks,
        "native_cuda_graphs": native_graphs,
    }
    print(report.data["runner"], flush=True)
    graph_forward = runner.forward if native_graphs else None

    with report.section("zeroserve eager") as rows:
        runner.forward = eager_forward
        for batch in batches:
            rows.append({"engine": "zeroserve eager", **decode_run(runner, batch, args)})
            print(rows[-1], flush=True)

    with report.section("zeroserve cuda graphs") as rows:
        if args.device != "cuda":
            print("CPU: no CUDA graphs; running the DecodeGraphs wrapper's eager fallback")
        if graph_forward is None:
            from zeroserve.gpu_worker.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(
                eager_forward,
                runner.kv_caches,
                max_batch=max(batches),
                max_blocks_per_seq=-(-runner.max_model_len // runner.block_size),
                max_model_len=runner.max_model_len,
                hidden_size=runner.model_config.hidden_size,
                dtype=runner.dtype,
                device=runner.device,
                buckets=sorted(set(batches)),
            )
            graphs.capture()
            report.data["runner"]["graph_capture_s"] = round(graphs.capture_time_s, 1)
            graph_forward = graphs
        runner.forward = graph_forward
        for batch in batches:
            replays_before = getattr(graph_forward, "replays", None)
            result = decode_run(runner, batch, args)
            if replays_before is not None:
                result["graph replays"] = graph_forward.replays - replays_before
            rows.append(
                {
                    "engine": "zeroserve graphs" if args.device == "cuda" else "zeroserve (no graphs on cpu)",
                    **result,
                }
            )
            print(rows[-1], flush=True)
    runner.forward = eager_forward
    del runner
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    setup_device(args)
    if args.device == "cpu" and args.kernels != "triton":
        os.environ.pop("TRITON_INTERPRET", None)  # the torch kernels need no interpreter
    import torch

    if args.device == "cpu":
        torch.set_num_threads(2)
    report = Report("bench_e2e", args)
    config_dir = args.config
    if args.tiny:
        config_dir = tiny_config_dir()
        args.input_len, args.output_len, args.warmup_steps, args.max_model_len = 16, 4, 1, 128
        if args.batches == "1,32,256":
            args.batches = "1,4"
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    report.data["setup"] = {
        "config": config_dir,
        "batches": batches,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "dtype": str(dtype),
    }

    # HF first: it frees its weights before the runner sizes its KV cache from free memory
    if not args.skip_hf:
        with report.section("hf generate") as rows:
            bench_hf(args, config_dir, batches, dtype, rows)
    with report.section("zeroserve runner"):
        bench_zeroserve(args, config_dir, batches, report)

    table = [
        r
        for title in ("hf generate", "zeroserve eager", "zeroserve cuda graphs")
        for r in report.data["sections"].get(title, [])
    ]
    print()
    print_table(table, ["engine", "batch", "tok/s", "ms/step", "p50 ms", "graph replays"])
    report.save()
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
