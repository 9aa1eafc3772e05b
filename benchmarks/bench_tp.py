"""Tensor parallelism's overheads on this machine: all-reduce per layer and plan fan-out per
step, in microseconds, beside the decode step time, at TP=1/2/3 (CPU: gloo).

    python benchmarks/bench_tp.py                      # SmolLM2-135M's size, TP 1,2,3, batch 1 and 8
    python benchmarks/bench_tp.py --tp 2 --batch 4 --steps 32 --quantization none
    python benchmarks/bench_tp.py --device cuda --tp 2   # NCCL, one GPU per rank

The default model has SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536, vocab 49152) with
12 query heads and 6 KV heads of 48 (SmolLM2's own 9/3 heads cannot be split in 2), random
weights (--load-format dummy); ``--model`` takes a GGUF or HF folder instead.

Each TP size starts N rank processes (this file with --rank) that join through the worker's own
GroupLink (rendezvous, gloo/NCCL) and run the real ModelRunner; rank 0 drives the real
scheduler in-process over B requests that decode ``--steps`` tokens, forwarding every plan to
the others exactly as the worker process does (``GroupLink.forward``: the encoded plan over
ipc ROUTER -> DEALER). Measured on rank 0, per decode step:

    step        execute() wall time (forward, collectives, sampling)
    all-reduce  each row-parallel projection's sum (2 per layer) + the embedding's
    gather      the logits [B, V/N] of every rank to rank 0;  bcast: the sampled ids back
    fan-out     rank 0 sending the plan -> each other rank holding it (monotonic clock,
                the same on every process of the machine); also a gloo broadcast of the same
                bytes (the alternative) for comparison

On a CPU the ranks share the machine's cores (each gets cores/N threads, as the worker does),
so TP > 1 is not faster here: the point is what the collectives cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def rank_main(spec_path: str, rank: int, out_path: str) -> None:
    import msgspec
    import torch
    import torch.distributed as dist

    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from zeroserve.gpu_worker.parallel import GroupLink
    from zeroserve.gpu_worker.proc import replica_placement
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.shared.config import read_config
    from zeroserve.shared.messages import SamplingParams, WorkerExit

    with open(spec_path) as f:
        spec = json.load(f)
    config = read_config(spec["config"])
    placement = replica_placement(config, 0, rank)
    runner_cfg = RunnerConfig(**spec["runner"], **placement)
    group = config.tensor_parallel_size > 1
    link = GroupLink(config, 0, rank) if group else None  # TP=1: the single-process path, as served
    tp = link.start(torch.device(runner_cfg.device), 600.0) if group else None
    runner = ModelRunner(runner_cfg, tp) if group else ModelRunner(runner_cfg)
    encoder = msgspec.msgpack.Encoder()
    out: dict = {"received": {}}
    if rank == 0:
        execute = runner.execute
        steps: list[dict] = []

        def timed_execute(plan):
            frame = encoder.encode(plan)
            sent = time.perf_counter()
            if group:
                link.forward(frame)
                tp.timings = {}
            result = execute(plan)
            steps.append(
                {
                    "step_id": plan.step_id,
                    "decode": not plan.new,
                    "batch": len(plan.new) + len(plan.running),
                    "sent": sent,
                    "plan_bytes": len(frame),
                    "step_s": time.perf_counter() - sent,
                    "timings": tp.timings if group else {},
                }
            )
            if group:
                tp.timings = None
            return result

        runner.execute = timed_execute
        params = SamplingParams(max_tokens=spec["steps"] + 1, temperature=0.0, ignore_eos=True)
        prompts = [[1, 504, 3458, 282, 4649, 314 + i] for i in range(spec["batch"])]
        InProcessEngine(runner).generate(prompts, params)
        out["steps"] = steps
        if group:
            link.forward(encoder.encode(WorkerExit(reason="done")))
    else:
        while not isinstance(plan := link.receive(), WorkerExit):
            out["received"][plan.step_id] = time.perf_counter()
            runner.execute(plan)
    # the alternative fan-out: a broadcast of the plan's bytes (its length first) over the group
    size = spec.get("plan_bytes", 600)
    times = [0.0]
    for _ in range(50 if group else 0):
        dist.barrier()
        start = time.perf_counter()
        n = torch.tensor([size], dtype=torch.int64)
        dist.broadcast(n, src=0)
        dist.broadcast(torch.zeros(int(n.item()), dtype=torch.uint8), src=0)
        times.append(time.perf_counter() - start)
    out["bcast_plan_s"] = statistics.median(times)
    # one all-reduce of a decode step's activations [B, H] alone, all ranks lined up by a barrier
    # (inside a step each all-reduce also waits for the slowest rank to get there)
    times = [0.0]
    for _ in range(50 if group else 0):
        x = torch.zeros(spec["batch"], runner.model_config.hidden_size, device=runner.device)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    out["all_reduce_alone_s"] = statistics.median(times[1:] or times)
    if group and rank == 0:
        link.close(linger_s=10.0)
    with open(out_path, "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    os._exit(0)  # skip the group's destructors (see gpu_worker/proc.py)


SYNTHETIC = {  # SmolLM2-135M's sizes, with heads that split in 2 and in 3
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 12,
    "num_key_value_heads": 6,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def run(args, tp: int, batch: int) -> dict:
    from zeroserve.shared.config import EngineConfig, write_config
    from zeroserve.shared.model_files import resolve_model

    with tempfile.TemporaryDirectory(prefix="zs-bench-tp-") as d:
        os.chmod(d, 0o700)
        load_format = "auto"
        if args.model is None:
            model, load_format = os.path.join(d, "model"), "dummy"
            os.mkdir(model)
            with open(os.path.join(model, "config.json"), "w") as f:
                json.dump(SYNTHETIC, f)
        else:
            model = resolve_model(args.model)
        config = os.path.join(d, "config.json")
        write_config(
            EngineConfig(
                model=model, served_model_name="bench", run_dir=d, tensor_parallel_size=tp, device=args.device
            ),
            config,
        )
        spec = os.path.join(d, "spec.json")
        runner = {
            "model": model,
            "device": args.device,
            "quantization": args.quantization,
            "load_format": load_format,
            "num_kv_blocks": 256,
            "max_model_len": 1024,
        }
        with open(spec, "w") as f:
            json.dump({"config": config, "runner": runner, "batch": batch, "steps": args.steps}, f)
        outs = [os.path.join(d, f"rank{r}.json") for r in range(tp)]
        procs = [
            subprocess.Popen([sys.executable, __file__, "--rank", str(r), spec, outs[r]]) for r in range(tp)
        ]
        codes = [p.wait(timeout=900) for p in procs]
        if codes != [0] * tp:
            raise SystemExit(f"TP={tp}: rank exit codes {codes}")
        results = []
        for path in outs:
            with open(path) as f:
                results.append(json.load(f))
    steps = [s for s in results[0]["steps"] if s["decode"]][2:]  # warm-up steps left out
    med = lambda xs: statistics.median(xs) * 1e6 if xs else 0.0  # noqa: E731
    row = {"tp": tp, "batch": batch, "step_us": med([s["step_s"] for s in steps])}
    reduces = [x for s in steps for x in s["timings"].get("all_reduce", [])]
    per_step = [len(s["timings"].get("all_reduce", [])) for s in steps]
    row["all_reduce_us"] = med(reduces)
    row["all_reduces_per_step"] = per_step[0] if per_step else 0
    row["all_reduce_per_step_us"] = med([sum(s["timings"].get("all_reduce", [0])) for s in steps])
    row["gather_us"] = med([x for s in steps for x in s["timings"].get("gather_logits", [])])
    row["bcast_ids_us"] = med([x for s in steps for x in s["timings"].get("broadcast_ids", [])])
    lags = [
        float(r["received"][str(s["step_id"])]) - s["sent"]
        for r in results[1:]
        for s in steps
        if str(s["step_id"]) in r["received"]
    ]
    row["fanout_us"] = med(lags)
    row["plan_bytes"] = steps[0]["plan_bytes"] if steps else 0
    row["bcast_plan_us"] = results[0]["bcast_plan_s"] * 1e6 if tp > 1 else 0.0
    row["all_reduce_alone_us"] = results[0]["all_reduce_alone_s"] * 1e6
    return row


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--rank":
        rank_main(argv[2], int(argv[1]), argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="GGUF or HF folder (default: SmolLM2-135M's size, 12/6 heads)"
    )
    p.add_argument("--tp", default="1,2,3", help="TP sizes, comma-separated")
    p.add_argument("--batch", default="1,8", help="decode batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=24, help="decode steps per run")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    rows = [run(args, int(t), int(b)) for b in args.batch.split(",") for t in args.tp.split(",")]
    print(
        "| TP | batch | decode step (us) | all-reduces/step | all-reduce in a step (us, each) "
        "| all-reduce per layer (us) | all-reduces per step (us) | all-reduce alone (us) | logits gather (us) "
        "| ids broadcast (us) | plan fan-out (us) | plan bytes | gloo bcast of the plan (us) |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        print(
            f"| {r['tp']} | {r['batch']} | {r['step_us']:.0f} | {r['all_reduces_per_step']} | "
            f"{r['all_reduce_us']:.0f} | {2 * r['all_reduce_us']:.0f} | {r['all_reduce_per_step_us']:.0f} | "
            f"{r['all_reduce_alone_us']:.0f} | "
            f"{r['gather_us']:.0f} | {r['bcast_ids_us']:.0f} | {r['fanout_us']:.0f} | {r['plan_bytes']} | "
            f"{r['bcast_plan_us']:.0f} |"
        )


if __name__ == "__main__":
    main()
