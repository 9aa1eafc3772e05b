"""zeroserve against the servers users would pick instead, on this machine, in one run.

Starts each server in turn (one at a time, so none steals the others' cores), waits until it
answers ``GET /v1/models``, runs ``zeroserve bench sweep`` against it (the same random prompts
for all: sized with the packaged GGUF's tokenizer), stops it, and prints two tables per
concurrency: output tok/s with inter-token latency p50, and time to first token p50 (p99).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_peers.py \\
        --llama-server ~/.cache/zeroserve-peers/llama/build/bin/llama-server \\
        --vllm-python ~/.cache/zeroserve-peers/vllm-venv/bin/python --vllm-model /tmp/peers/smollm2-hf \\
        --zeroserve none,int8,q4 --concurrency 1,16,64 --out-dir /tmp/peers/run

The peers are built by ../shared/peers/setup_llama_server.sh and setup_vllm_cpu.sh (vLLM reads
an HF folder: ../shared/peers/gguf_to_hf.py makes one from the same GGUF). A server that does not
come up is reported with the tail of its log, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from zeroserve.shared.model_files import resolve_model


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        lines = (out.stdout + out.stderr).strip().splitlines()
        return next((ln for ln in lines if "version" in ln.lower()), lines[-1])[:120]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def targets(args: argparse.Namespace, gguf: str) -> list[dict]:
    """(name, weights, command, env) of every server asked for."""
    out = []
    port = args.port
    slots = max(args.levels)
    if args.llama_server:
        out.append(
            {
                "name": "llama.cpp server",
                "weights": "Q4_1 (the GGUF)",
                "version": _version([args.llama_server, "--version"]),
                "cmd": [
                    args.llama_server,
                    "-m",
                    gguf,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "-np",  # a slot per concurrent request, each with room for a prompt and its output
                    str(slots),
                    "-c",
                    str(max(16384, slots * (args.input_len + args.output_len + 64))),
                    "-t",
                    str(args.threads),
                ],
                "env": {},
                "ready": "/health",
                "port": port,
            }
        )
        port += 1
    if args.vllm_python:
        for dtype in args.vllm_dtypes.split(","):
            out.append(
                {
                    "name": f"vLLM CPU ({dtype})",
                    "weights": dtype,
                    "version": _version([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"]),
                    "cmd": [
                        args.vllm_python,
                        "-m",
                        "vllm.entrypoints.openai.api_server",
                        "--model",
                        args.vllm_model,
                        "--served-model-name",
                        "SmolLM2-135M-Instruct",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--max-model-len",
                        "2048",
                        "--dtype",
                        dtype,
                    ],
                    "env": {
                        "VLLM_CPU_KVCACHE_SPACE": "4",
                        "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
                        "OMP_NUM_THREADS": str(args.threads),
                    },
                    "ready": "/health",
                    "port": port,
                }
            )
            port += 1
    zs = str(Path(sys.executable).with_name("zeroserve"))
    for mode in [m for m in args.zeroserve.split(",") if m]:
        extra = (
            ["--dtype", "bfloat16", "--quantization", "none"] if mode == "bf16" else ["--quantization", mode]
        )
        out.append(
            {
                "name": f"zeroserve ({mode})",
                "weights": mode,
                "version": _version(
                    [
                        sys.executable,
                        "-c",
                        "import zeroserve, importlib.metadata as m; print(m.version('zeroserve'))",
                    ]
                ),
                "cmd": [
                    zs,
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--max-model-len",
                    "2048",
                    *extra,
                ],
                "env": {"OMP_WAIT_POLICY": "PASSIVE"},
                "ready": "/ready",
                "port": port,
            }
        )
        port += 1
    return out


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without the OpenMP settings the benchmark itself runs under (a peer
    left with OMP_WAIT_POLICY=PASSIVE would pay a thread wake-up at every op: 3x slower for
    llama.cpp), plus what the target sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    return {**env, **extra}


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Until ``url + path`` answers 200 (zeroserve's /ready: a worker has loaded; the peers'
    /health), or the server exits, or ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + path, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", help="llama-server binary (omit to skip)")
    ap.add_argument("--vllm-python", help="python of the vLLM CPU venv (omit to skip)")
    ap.add_argument("--vllm-model", help="HF folder of the same weights for vLLM")
    ap.add_argument(
        "--vllm-dtypes", default="bfloat16", help="comma-separated; vLLM's CPU default is bfloat16"
    )
    ap.add_argument(
        "--zeroserve", default="none,int8,q4", help="--quantization modes (bf16: --dtype bfloat16)"
    )
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--out-dir", default="bench-peers")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]

    gguf = resolve_model(None)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for t in targets(args, gguf):
        slug = "".join(c if c.isalnum() else "_" for c in t["name"]).strip("_")
        log_path = out_dir / f"{slug}.log"
        print(f"== {t['name']}: starting ({' '.join(t['cmd'])})", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                t["cmd"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(t["env"]),
                cwd=out_dir,  # not the repo: its top-level packages (kernels/, ...) would shadow a peer's
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{t['port']}"
        try:
            if not wait_ready(url, t["ready"], proc, args.start_timeout):
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                print("   did not come up; last log lines:\n     " + "\n     ".join(tail), flush=True)
                results.append({**t, "error": "did not start"})
                continue
            js = out_dir / f"{slug}.json"
            cmd = [
                str(Path(sys.executable).with_name("zeroserve")),
                "bench",
                "sweep",
                "--target",
                f"{slug}={url}",
                "--concurrency",
                args.concurrency,
                "--input-len",
                str(args.input_len),
                "--output-len",
                str(args.output_len),
                "--tokenizer",
                gguf,
                "--output-json",
                str(js),
                "--disable-tqdm",
            ]
            subprocess.run(cmd, check=False)
            runs = json.loads(js.read_text())["targets"][0]["runs"] if js.exists() else []
            results.append({**t, "runs": runs})
        finally:
            stop(proc)

    levels = args.levels
    print(
        "\n| server | version | weights | " + " | ".join(f"C={c} tok/s (ITL p50 ms)" for c in levels) + " |"
    )
    print("|---|---|---|" + "---|" * len(levels))
    for r in results:
        cells = []
        by_c = {run["concurrency"]: run for run in r.get("runs", [])}
        for c in levels:
            run = by_c.get(c)
            if run is None or not run.get("completed"):
                cells.append(r.get("error", "-"))
            else:
                cells.append(f"{run['output_throughput']:.1f} ({run['p50_itl_ms']:.1f})")
        print(f"| {r['name']} | {r['version']} | {r['weights']} | " + " | ".join(cells) + " |")
    # time to first token: what a long prompt costs (--input-len 1500 compares prefill)
    print("\n| server | " + " | ".join(f"C={c} TTFT p50 ms (p99)" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for r in results:
        by_c = {run["concurrency"]: run for run in r.get("runs", [])}
        cells = [
            f"{by_c[c]['p50_ttft_ms']:.0f} ({by_c[c]['p99_ttft_ms']:.0f})"
            if by_c.get(c, {}).get("completed")
            else r.get("error", "-")
            for c in levels
        ]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    summary = [{k: v for k, v in r.items() if k != "env"} for r in results]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
