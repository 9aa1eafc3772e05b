"""Shared by the GPU check scripts: arguments, timing, sections that fail alone, JSON out.

Every script takes ``--device cuda|cpu`` and ``--tiny``. ``--device cpu --tiny`` runs the same
code at toy sizes on a CPU (Triton kernels through the interpreter, which the script must
request before importing Triton: see ``setup_device``), so the scripts can be dry-run on a
machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from contextlib import contextmanager


def parse_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU dry run)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for the JSON results")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def setup_device(args: argparse.Namespace) -> None:
    """Before torch/triton import: the interpreter on CPU (Triton reads it at kernel import)."""
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def environment() -> dict:
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    return info


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_fn(fn, device: str, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call. CUDA: events around each call (after warmup, which also
    JIT-compiles); CPU: wall clock."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class Report:
    """Rows of results grouped by section; a failing section records its error and the
    script goes on. ``save`` writes ``<out>/<name>.json``."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.data: dict = {
            "script": name,
            "device": args.device,
            "tiny": args.tiny,
            "sections": {},
            "errors": {},
        }
        self.started = time.perf_counter()

    @contextmanager
    def section(self, title: str):
        print(f"\n=== {title}", flush=True)
        t0 = time.perf_counter()
        try:
            yield self.data["sections"].setdefault(title, [])
        except Exception as exc:  # noqa: BLE001 - report and continue with the next section
            tb = traceback.format_exc()
            print(f"!!! {title} FAILED: {type(exc).__name__}: {exc}\n{tb[-3000:]}", flush=True)
            self.data["errors"][title] = f"{type(exc).__name__}: {exc}"
        finally:
            print(f"--- {title}: {time.perf_counter() - t0:.1f}s", flush=True)

    def save(self) -> str:
        try:
            self.data["environment"] = environment()
        except Exception as exc:  # noqa: BLE001
            self.data["environment"] = {"error": str(exc)}
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        os.makedirs(self.args.out, exist_ok=True)
        path = os.path.join(self.args.out, f"{self.name}.json")
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        print(f"\nwrote {path}", flush=True)
        return path

    def exit_code(self) -> int:
        return 1 if self.data["errors"] else 0


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A markdown table of ``rows`` (dicts) over ``columns``."""
    if not rows:
        print("(no rows)")
        return

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()
