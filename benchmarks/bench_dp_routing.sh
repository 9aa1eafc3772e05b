#!/usr/bin/env bash
# --data-parallel-size 2 with each --routing policy on the real stack, one server at a time:
#   G=8 KV=100 benchmarks/bench_dp_routing.sh   (G system prompts of 512 tokens, KV blocks per replica)
cd "$(dirname "$0")/.."
G=${G:-8}; KV=${KV:-100}
for policy in prefix_aware round_robin least_loaded; do
  OMP_WAIT_POLICY=PASSIVE .venv/bin/zeroserve serve --port 8733 --max-model-len 2048 --data-parallel-size 2 --num-threads 1 --num-kv-blocks $KV --routing $policy > /tmp/dp_$policy.log 2>&1 &
  pid=$!
  for i in $(seq 120); do
    if curl -s localhost:8733/health | python3 -c 'import sys,json; d=json.load(sys.stdin); r=d.get("replicas",[]); sys.exit(0 if len(r)==2 and all(x.get("live") for x in r) else 1)' 2>/dev/null; then break; fi
    sleep 1
  done
  echo "== $policy (G=$G KV=$KV)"
  .venv/bin/zeroserve bench serve --base-url http://127.0.0.1:8733 --dataset shared-prefix --num-groups $G --prefix-len 512 --input-len 32 --output-len 32 --num-prompts 64 --max-concurrency 8 --seed 0 --disable-tqdm 2>&1 | grep -iE "hit|TTFT|output token|throughput" | head -8
  kill $pid; wait $pid 2>/dev/null
done
