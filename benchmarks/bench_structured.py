"""The per-step cost of constrained decoding (xgrammar masks) against free decoding, at
batch 1, 16 and 64, on the real scheduler and ModelRunner in one process.

    python benchmarks/bench_structured.py                         # the packaged SmolLM2 GGUF
    python benchmarks/bench_structured.py --batch 1 16 64 --steps 48 --device cuda

Each batch size runs twice over the same prompts, decoding ``--steps`` tokens per request
(min_tokens = max_tokens in both runs, so neither stops early and the sampler does the same
work): once free, once with every request under a grammar. Two grammars:

    text    EBNF ``root ::= [a-z ,.]*``: most of the vocabulary stays possible each step
            (like the body of a JSON string, xgrammar's expensive case)
    json    a JSON schema (an object with a bounded string, an integer, an enum array),
            decoded until it completes (then the runs stop at the same step count)

Reported per decode step (steps with no prefill): the median of a run's steps, the best of
``--rounds`` runs (free and grammar runs interleaved):

    free     execute() wall time without constraints
    grammar  execute() wall time with every row constrained
    +ms      grammar - free;  wait: what the step waited for the mask thread (the rest of the
             mask work ran during the forward);  apply: copying the rows' masks and setting
             logits to -inf;  accept: matchers advancing by the sampled tokens (then the next
             masks queued);  fill: the mask thread's work per step (masks of every
             constrained row; it runs while the forward pass does, so only ``wait`` of it
             lands on the step)

On a shared machine the step times move by tens of percent between runs whatever the
grammar does; wait, apply and accept are timed inside the step and are the grammar's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from zeroserve.gpu_worker.model_runner import RunnerConfig  # noqa: E402
from zeroserve.launcher.inprocess import InProcessEngine  # noqa: E402
from zeroserve.shared.messages import SamplingParams, StructuredOutput  # noqa: E402

TEXT = StructuredOutput("grammar", "root ::= [a-z ,.]*")
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 200},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 40},
    },
    "required": ["title", "year", "tags"],
}
JSON = StructuredOutput("json", json.dumps(SCHEMA))


def run(engine: InProcessEngine, prompts, params) -> tuple[list[float], int]:
    """Decode-step times (s) and the number of steps."""
    times: list[float] = []

    def on_step(step) -> None:
        if not step.plan.new and all(r.num_new_tokens == 1 for r in step.plan.running):
            times.append(step.result.step_time_s)

    engine.generate(prompts, params, on_step=on_step)
    return times, len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: the packaged SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=32, help="tokens decoded per request")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=3, help="free/grammar runs, interleaved; the best of each")
    ap.add_argument("--grammar", choices=["text", "json"], nargs="+", default=["text", "json"])
    args = ap.parse_args()

    config = RunnerConfig(
        model=args.model, device=args.device, max_num_seqs=max(args.batch), num_kv_blocks=2048
    )
    engine = InProcessEngine(config)
    runner = engine.runner
    prompt = [1] + [(17 * i) % 3000 + 100 for i in range(31)]  # 32 tokens, the same for every run
    print(f"model {runner.model_path} on {runner.device}, {runner.quantization_summary}")
    print(f"{args.steps} decode steps per request, temperature {args.temperature}, median per decode step")
    header = f"{'grammar':8} {'batch':>5} {'free ms':>8} {'grammar ms':>10} {'+ms':>7} {'+%':>6}"
    header += f" {'wait ms':>8} {'apply ms':>9} {'accept ms':>10} {'fill ms':>8}"
    print(header)
    for name in args.grammar:
        so = TEXT if name == "text" else JSON
        for batch in args.batch:
            prompts = [prompt] * batch
            n = args.steps
            base = dict(max_tokens=n, min_tokens=n, temperature=args.temperature, seed=0, ignore_eos=True)
            free_params = SamplingParams(**base)
            if name == "json":  # the schema completes on its own: no min_tokens (EOS would be hidden)
                constrained = SamplingParams(**{**base, "min_tokens": 0, "ignore_eos": False}, structured=so)
            else:
                constrained = SamplingParams(**base, structured=so)
            # warm-up: the grammar compiled and cached, the kernels at this batch size
            engine.generate(prompts, SamplingParams(**{**base, "max_tokens": 4, "min_tokens": 4}))
            engine.generate(prompts[:1], constrained)
            book = runner.grammar
            rounds = []  # (free median, grammar median, wait, apply, accept per step): interleaved,
            for _ in range(args.rounds):  # the best round of each: a shared machine's noise is one-sided
                free, _ = run(engine, prompts, free_params)
                book.wait_s = book.apply_s = book.accept_s = book.fill_s = 0.0
                timed, steps = run(engine, prompts, constrained)
                per = 1000.0 / max(steps, 1)  # the prefill step's share is in these too
                rounds.append(
                    (
                        statistics.median(free) * 1e3,
                        statistics.median(timed) * 1e3,
                        book.wait_s * per,
                        book.apply_s * per,
                        book.accept_s * per,
                        book.fill_s * per,
                    )
                )
            f = min(r[0] for r in rounds)
            g = min(r[1] for r in rounds)
            wait, apply, accept, fill = (min(r[k] for r in rounds) for k in (2, 3, 4, 5))
            print(
                f"{name:8} {batch:>5} {f:>8.2f} {g:>10.2f} {g - f:>7.2f} {100 * (g - f) / f:>5.1f}%"
                f" {wait:>8.3f} {apply:>9.3f} {accept:>10.3f} {fill:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
