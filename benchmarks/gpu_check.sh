#!/usr/bin/env bash
# One GPU check of zeroserve's kernels and decode speed, for a machine where nothing can be
# installed (torch, triton, transformers, numpy present; pyzmq/msgspec maybe as wheels in .whl/).
#
#   bash benchmarks/gpu_check.sh            # results: $OUT (default ./out)
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_check.sh   # CPU dry run at toy sizes
#
# Sections, each under its own time limit so one hang cannot eat the others' time
# (total < 8.5 minutes on one H200):
#   1. compile check   every kernel -> cubin for this GPU's arch (no launch)         45 s
#   2. check_kernels   every Triton kernel vs its torch reference, fp32 and bf16;   150 s
#                      on sm_89+ also fp8: e4m3 linear (Triton, _scaled_mm), e4m3 KV cache
#   3. bench_kernels   decode attention GB/s vs peak, prefill TFLOP/s, elementwise;  110 s
#                      fp8 linear vs bf16 cuBLAS (SmolLM2, Llama-3-8B), e4m3 KV decode
#   4. bench_e2e       Llama-3-8B dummy weights: decode tok/s at batch 1/32/256,      190 s
#                      eager and CUDA graphs, beside HF generate
#   5. bench_tp        only with 2+ GPUs: NCCL all-reduce per layer, plan fan-out     90 s
#                      per step and decode step time at TP 1/2 (benchmarks/bench_tp.py)
# A failing section is reported and the script goes on; the exit status is 1 if any failed.
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
export OUT
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
TINY_FLAG=""
[ -n "${TINY:-}" ] && TINY_FLAG="--tiny"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

# --- make `import zeroserve.*` work without installing the project -------------------------
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || say "WARNING: installing .whl/*.whl failed; continuing without them"
fi
SHIM="$(mktemp -d /tmp/zeroserve-shim.XXXXXX)"
mkdir -p "$SHIM/zeroserve"
for pkg in api_proc tokenizer_proc scheduler_proc gpu_worker kernels shared launcher; do
  [ -d "$REPO/$pkg" ] && ln -s "$REPO/$pkg" "$SHIM/zeroserve/$pkg"
done
export PYTHONPATH="$SITE:$SHIM${PYTHONPATH:+:$PYTHONPATH}"

say "== zeroserve gpu_check $(date -u +%FT%TZ) device=$DEVICE ${TINY_FLAG} out=$OUT"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import torch, triton
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
else:
    print("no CUDA device visible")
import zeroserve.kernels.triton.ops  # the shim works
print("import zeroserve.kernels.triton.ops: ok from", zeroserve.kernels.triton.ops.__file__)
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"

FAILED=()
run() {  # run NAME LIMIT_S CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  say ""
  say "######## $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "######## $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
}

if [ "$DEVICE" = cuda ]; then
  ARCH=$("$PY" -c "import torch; p=torch.cuda.get_device_properties(0); print(p.major*10+p.minor)" 2>/dev/null || echo 90)
  run "compile check sm_$ARCH" 45 env -u TRITON_INTERPRET "$PY" -m zeroserve.kernels.triton.compile_check --quick \
      --arch "$ARCH" --json "$OUT/compile_check.json"
fi
run check_kernels 150 "$PY" benchmarks/gpu/check_kernels.py --device "$DEVICE" $TINY_FLAG --out "$OUT"
run bench_kernels 110 "$PY" benchmarks/gpu/bench_kernels.py --device "$DEVICE" $TINY_FLAG --out "$OUT"
run bench_e2e 190 "$PY" benchmarks/gpu/bench_e2e.py --device "$DEVICE" $TINY_FLAG --out "$OUT"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 2 ]; then
  run bench_tp 90 "$PY" benchmarks/bench_tp.py --device cuda --tp 1,2 --batch 1,8 --steps 16 --quantization none
else
  say "bench_tp: skipped ($NGPU GPU(s) visible; tensor parallelism over NCCL needs 2 or more)"
fi

# --- one summary table from the JSON files ------------------------------------------------
"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except Exception as exc:
        print(f"{name}: no results ({exc})")
        return None
summary = {}
c = load("check_kernels")
if c:
    bad = [f"{r['op']} {r['dtype']}" for r in c.get("checks", []) if not r["ok"]]
    summary["kernel checks"] = f"{len(c.get('checks', [])) - len(bad)}/{len(c.get('checks', []))} ok" + (f"; FAILED {bad}" if bad else "")
    if c.get("errors"): summary["kernel check errors"] = c["errors"]
b = load("bench_kernels")
if b:
    for r in b.get("sections", {}).get("decode attention", []):
        summary[f"decode attn b{r['batch']} ctx{r['context']}"] = f"{r['GB/s']:.0f} GB/s ({r['% of peak']:.0f}% of peak), {r['us']:.0f} us"
    for r in b.get("sections", {}).get("extend attention (prefill)", []):
        summary[f"prefill attn {r['tokens']} tokens"] = f"{r['TFLOP/s']:.0f} TFLOP/s"
    for r in b.get("sections", {}).get("fp8 linear vs bf16", []):
        cells = [f"{k[:-2]} {r[k]:.2f}x" for k in ("torch._scaled_mm x", "triton x") if k in r]
        summary[f"fp8 {r['proj']} M{r['M']}"] = f"bf16 {r['bf16 us']:.0f} us; vs bf16: " + ", ".join(cells)
    for r in b.get("sections", {}).get("decode attention, e4m3 KV cache", []):
        summary[f"decode attn e4m3 b{r['batch']} ctx{r['context']}"] = ", ".join(
            f"{k} {v:.0f}" for k, v in r.items() if k.endswith("us") or k.endswith("GB/s"))
e = load("bench_e2e")
if e:
    for title in ("hf generate", "zeroserve eager", "zeroserve cuda graphs"):
        for r in e.get("sections", {}).get(title, []):
            summary[f"{r['engine']} batch {r['batch']}"] = f"{r['tok/s']:.0f} tok/s ({r['ms/step']:.1f} ms/step)"
    if e.get("errors"): summary["e2e errors"] = e["errors"]
print("\n================ summary")
width = max([len(k) for k in summary] + [10])
for k, v in summary.items():
    print(f"{k.ljust(width)}  {v}")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
PYEOF

say ""
say "total $(( $(date +%s) - START ))s; results in $OUT"
rm -rf "$SHIM"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED: ${FAILED[*]}"
  exit 1
fi
say "all sections passed"
