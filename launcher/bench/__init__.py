"""`zeroserve bench`: a serving benchmark for any OpenAI-compatible HTTP server.

datasets.py  prompts generated locally (random token lengths, multi-turn chat, user JSONL)
client.py    one streaming request over aiohttp, SSE parsing, per-chunk timings
runner.py    arrivals (Poisson / gamma / closed loop), warm-up, probing optional fields
metrics.py   percentiles, TTFT / TPOT / ITL / E2EL, throughput, goodput under SLOs
report.py    the summary table and the JSON written with every figure
plots.py     PNG charts (matplotlib, Agg backend)
cli.py       `add_parser(subparsers)` and `run(args)` for `bench serve` and `bench sweep`
"""
