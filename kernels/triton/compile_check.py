"""Compile every Triton kernel for real GPU targets on a machine without a GPU.

``python -m zeroserve.kernels.triton.compile_check --arch 90 --arch 80 [--json FILE]``

The wrappers themselves pick block sizes, constexprs and num_warps, so this module drives
the real wrappers (at Llama-3-8B shapes, on CPU tensors) with ``JITFunction.run`` swapped for
a recorder: every launch they would make is captured with its exact arguments, turned into
a signature (pointer dtypes, int/float scalars, constexpr values, 16-byte divisibility as
the JIT would specialize it) and compiled through the full pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas shipped in the Triton wheel). No CUDA driver is needed.

Exit status 1 if any launch fails to compile or needs more shared memory than the target
has. Launches labelled "fp8 ..." (e4m3 projections and KV cache) are compiled only for sm_89+
(Triton has no e4m3 type below) and reported as skipped elsewhere; ``--fp8`` compiles just them. Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from zeroserve.kernels.triton._common import interpreting

# usable shared memory per block, bytes (opt-in maximum)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SIG_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv",
}
FP8_MIN_ARCH = 89
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Launch:
    label: str
    fn: JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, int]
    results: dict[int, dict] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (
            self.fn.fn.__qualname__,
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
            tuple(sorted(self.options.items())),
        )


def _describe(fn: JITFunction, args: tuple, kwargs: dict, label: str) -> Launch:
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_KEYS}
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for param in fn.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + SIG_DTYPE[value.dtype]
            attrs[(param.num,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(param.num,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot type argument {param.name}={value!r}")
    return Launch(label, fn, signature, constexprs, attrs, options)


@contextlib.contextmanager
def recording(launches: list[Launch], label: list[str]):
    """Within the block, kernel launches are recorded (as Launch) instead of run."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(_describe(self, args, dict(kwargs), label[0]))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def llama3_8b_launches() -> list[Launch]:
    """Every distinct launch the wrappers make for Llama-3-8B-shaped inputs (and head_dim 64)."""
    from zeroserve.kernels.metadata import AttentionMetadata
    from zeroserve.kernels.triton import ops, sampling

    launches: list[Launch] = []
    label = [""]
    hidden, inter, hq, hkv = 4096, 14336, 32, 8
    with recording(launches, label), torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = SIG_DTYPE[dtype]
            x = torch.empty(4, hidden, dtype=dtype)
            w = torch.empty(hidden, dtype=dtype)
            label[0] = f"rms_norm {name}"
            ops.rms_norm(x, w, 1e-5)
            label[0] = f"rms_norm+residual {name}"
            ops.rms_norm(x, w, 1e-5, residual=x)
            label[0] = f"silu_and_mul {name}"
            ops.silu_and_mul(torch.empty(4, 2 * inter, dtype=dtype))
            for head_dim in (128, 64):
                q = torch.empty(4, hq, head_dim, dtype=dtype)
                k = torch.empty(4, hkv, head_dim, dtype=dtype)
                cache = torch.empty(8, 16, hkv, head_dim, dtype=dtype)
                label[0] = f"rotary {name} d{head_dim}"
                ops.rotary(torch.zeros(4, dtype=torch.int64), q, k, torch.empty(64, head_dim))
                label[0] = f"write_kv {name} d{head_dim}"
                ops.write_kv(k, k, cache, cache, torch.zeros(4, dtype=torch.int64))
                scale = head_dim**-0.5
                # decode: batch 256 (one split, direct) and batch 1 at 4k context (split + reduce)
                for batch, ctx in ((256, 4096), (1, 4096)):
                    meta = AttentionMetadata.build([1] * batch, [ctx] * batch, [[0]] * batch, [0] * batch)
                    label[0] = f"decode {name} d{head_dim} b{batch} ctx{ctx}"
                    ops.paged_attention(
                        torch.empty(batch, hq, head_dim, dtype=dtype), cache, cache, meta, scale
                    )
                meta = AttentionMetadata.build([3, 1], [40, 7], [[0, 1, 2], [3]], [0] * 4)
                label[0] = f"extend {name} d{head_dim}"
                ops.paged_attention(q, cache, cache, meta, scale)
        fp8_launches(label, hidden, inter, hq, hkv)
        logits = torch.empty(4, 128256)
        params = (torch.zeros(4, dtype=torch.int64), torch.ones(4), torch.zeros(4), torch.ones(4))
        label[0] = "sampling filter (all)"
        sampling.top_k_top_p_min_p_filter(logits, *params)
        label[0] = "sampling filter (top-k only)"
        sampling.apply_top_k(logits, params[0])
        label[0] = "sampling filter (top-p only)"
        sampling.apply_top_p(logits, params[1])
    unique: dict[tuple, Launch] = {}
    for launch in launches:
        unique.setdefault(launch.key, launch)
    return list(unique.values())


def fp8_launches(label: list[str], hidden: int, inter: int, hq: int, hkv: int) -> None:
    """The e4m3 kernels (call within ``recording``): per-token activation quantization, the
    GEMM in each tile configuration (decode, mid, prefill M; N not a multiple of 16), and
    the KV write / decode / extend over an e4m3 cache with bf16 queries."""
    from zeroserve.kernels.metadata import AttentionMetadata
    from zeroserve.kernels.triton import fp8, ops

    e4m3 = torch.float8_e4m3fn
    label[0] = "fp8 quantize_rows"
    fp8.quantize_rows(torch.empty(4, hidden, dtype=torch.bfloat16))
    for m, n, bias in ((1, 3 * hidden, False), (64, 2 * inter, False), (256, hidden, True), (1, 100, True)):
        label[0] = f"fp8 gemm m{m} n{n}" + (" bias" if bias else "")
        fp8.fp8_matmul(
            torch.empty(m, hidden, dtype=e4m3),
            torch.empty(m, 1),
            torch.empty(n, hidden, dtype=e4m3),
            torch.empty(n),
            torch.empty(n, dtype=torch.bfloat16) if bias else None,
            torch.bfloat16,
        )
    head_dim = 128
    q = torch.empty(4, hq, head_dim, dtype=torch.bfloat16)
    k = torch.empty(4, hkv, head_dim, dtype=torch.bfloat16)
    cache = torch.empty(8, 16, hkv, head_dim, dtype=e4m3)
    label[0] = f"fp8 kv write_kv d{head_dim}"
    ops.write_kv(k, k, cache, cache, torch.zeros(4, dtype=torch.int64))
    for batch, ctx in ((256, 4096), (1, 4096)):
        meta = AttentionMetadata.build([1] * batch, [ctx] * batch, [[0]] * batch, [0] * batch)
        label[0] = f"fp8 kv decode d{head_dim} b{batch} ctx{ctx}"
        ops.paged_attention(torch.empty(batch, hq, head_dim, dtype=torch.bfloat16), cache, cache, meta, 0.1)
    meta = AttentionMetadata.build([3, 1], [40, 7], [[0, 1, 2], [3]], [0] * 4)
    label[0] = f"fp8 kv extend d{head_dim}"
    ops.paged_attention(q, cache, cache, meta, 0.1)


def fp8_only_launches() -> list[Launch]:
    return [launch for launch in llama3_8b_launches() if launch.label.startswith("fp8")]


# One launch of every kernel and every code path (16-bit tensor-core dots, fp32 3xTF32 dots,
# direct and split decode, every sampling filter): what the test suite compiles.
QUICK = (
    "rms_norm bf16",
    "rms_norm+residual bf16",
    "silu_and_mul bf16",
    "rotary bf16 d128",
    "write_kv bf16 d128",
    "decode bf16 d128 b256 ctx4096",
    "decode bf16 d128 b1 ctx4096",
    "extend bf16 d128",
    "decode fp32 d128 b1 ctx4096",
    "extend fp32 d128",
    "sampling filter (all)",
    "fp8 quantize_rows",
    "fp8 gemm m1 n12288",
    "fp8 gemm m256 n4096 bias",
    "fp8 kv write_kv d128",
    "fp8 kv decode d128 b1 ctx4096",
    "fp8 kv extend d128",
)


def quick_launches() -> list[Launch]:
    return [launch for launch in llama3_8b_launches() if launch.label in QUICK]


def compile_all(arches: list[int], launches: list[Launch] | None = None) -> tuple[list[Launch], list[str]]:
    """Compile each launch for each arch; returns (launches with results, failure lines)."""
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile for GPUs")
    launches = llama3_8b_launches() if launches is None else launches
    failures = []
    for launch in launches:
        for arch in arches:
            if launch.label.startswith("fp8") and arch < FP8_MIN_ARCH:
                launch.results[arch] = {"ok": False, "skipped": f"e4m3 needs sm_{FP8_MIN_ARCH}+"}
                continue
            start = time.perf_counter()
            try:
                src = triton.compiler.ASTSource(
                    fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs
                )
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
                shared = int(compiled.metadata.shared)
                ok = "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
                result = {"ok": ok, "shared_bytes": shared, "seconds": round(time.perf_counter() - start, 2)}
                if not ok:
                    failures.append(f"{launch.label} sm_{arch}: no cubin produced")
                elif shared > SHARED_LIMIT.get(arch, 99 * 1024):
                    result["ok"] = False
                    failures.append(f"{launch.label} sm_{arch}: needs {shared} B shared memory")
            except Exception as exc:  # noqa: BLE001 - every failure is reported, then the run fails
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                result = {"ok": False, "error": f"{type(exc).__name__}: {first}"}
                failures.append(f"{launch.label} sm_{arch}: {result['error']}")
            launch.results[arch] = result
    return launches, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--json", help="write the per-launch results here")
    parser.add_argument("--quick", action="store_true", help="one launch per kernel and code path")
    parser.add_argument("--fp8", action="store_true", help="only the e4m3 launches (sm_89+)")
    args = parser.parse_args(argv)
    arches = args.arch or [90, 80]
    start = time.perf_counter()
    chosen = quick_launches() if args.quick else fp8_only_launches() if args.fp8 else None
    launches, failures = compile_all(arches, chosen)
    for launch in launches:
        cells = []
        for arch in arches:
            r = launch.results[arch]
            verdict = (
                f"ok {r['shared_bytes'] // 1024}KiB smem" if r["ok"] else "skip" if "skipped" in r else "FAIL"
            )
            cells.append(f"sm_{arch}: {verdict}")
        print(
            f"{launch.fn.fn.__name__:24s} {launch.label:32s} warps={launch.options.get('num_warps', 4)} "
            + "  ".join(cells)
        )
    print(
        f"{len(launches)} launches x {len(arches)} targets in {time.perf_counter() - start:.1f}s, "
        f"{len(failures)} failures"
    )
    for line in failures:
        print("FAILED", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        "kernel": launch.fn.fn.__name__,
                        "label": launch.label,
                        "options": launch.options,
                        "results": {str(a): r for a, r in launch.results.items()},
                    }
                    for launch in launches
                ],
                f,
                indent=1,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
