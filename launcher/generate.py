"""`zeroserve generate`: one prompt, one completion, in this process (no server, no sockets).

    zeroserve generate --prompt "The capital of France is"
    zeroserve generate --chat --prompt "Name three colors." --max-tokens 64 --temperature 0.7 --seed 1

Greedy by default. Only the generated text goes to stdout (streamed as it is produced);
loading progress and a tokens/s line go to stderr, so the output can be piped.
"""

from __future__ import annotations

import argparse
import sys
import time

from zeroserve.launcher.engine_args import QUANTIZATIONS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a completion for one prompt, in this process",
        description="Load MODEL in this process and print the completion of --prompt on stdout.",
    )
    p.add_argument(
        "--model", default=None, help="GGUF file or Hugging Face folder (default: the packaged SmolLM2)"
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message through the chat template"
    )
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="projection weights' format, as for `zeroserve serve` (default auto)",
    )


def _fail(message: str) -> int:
    print(f"zeroserve generate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from zeroserve.gpu_worker.loader import CheckpointError, load_model_config
    from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from zeroserve.launcher.engine_args import default_device
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.shared.messages import SamplingParams
    from zeroserve.shared.model_files import ModelNotFoundError, resolve_model
    from zeroserve.tokenizer_proc.detokenizer import IncrementalDetokenizer
    from zeroserve.tokenizer_proc.errors import TokenizerError
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    if args.max_tokens < 1:
        return _fail("--max-tokens must be >= 1")
    try:
        path = resolve_model(args.model)
        tokenizer = load_tokenizer(path)
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt_ids = tokenizer.encode_chat(messages + [{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = tokenizer.encode(args.prompt)
        model_len = load_model_config(path).max_position_embeddings
    except (ModelNotFoundError, CheckpointError, TokenizerError) as e:
        return _fail(str(e))
    if not prompt_ids:
        return _fail("the prompt is empty")
    if len(prompt_ids) >= model_len:
        return _fail(f"the prompt has {len(prompt_ids)} tokens; the model's context is {model_len}")
    max_tokens = min(args.max_tokens, model_len - len(prompt_ids))

    # a KV cache for this one sequence, not the serving default
    block_size = 16
    total = len(prompt_ids) + max_tokens
    try:
        runner = ModelRunner(
            RunnerConfig(
                model=path,
                device=args.device or default_device(),
                dtype=args.dtype,
                quantization=args.quantization,
                block_size=block_size,
                num_kv_blocks=-(-total // block_size),
                max_model_len=total,
                max_num_seqs=1,
            )
        )
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    eos = sorted(set(runner.eos_token_ids) | set(tokenizer.eos_token_ids))
    engine = InProcessEngine(runner, eos_token_ids=eos)
    engine.add_request(prompt_ids, params)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    num_generated, finish_reason = 0, None
    start = time.perf_counter()
    first_token_at = None
    while (step := engine.step()) is not None:
        for delta in step.deltas:
            if delta.error is not None:
                return _fail(delta.error.message)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            num_generated += len(delta.token_ids)
            finish_reason = delta.finish_reason or finish_reason
            sys.stdout.write(detok.push([t for t in delta.token_ids if t not in eos]))
            sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    sys.stdout.flush()

    end = time.perf_counter()
    decode_s = end - (first_token_at or end)
    rate = (num_generated - 1) / decode_s if num_generated > 1 and decode_s > 0 else 0.0
    print(
        f"{len(prompt_ids)} prompt tokens, {num_generated} generated ({finish_reason}); "
        f"time to first token {(first_token_at or end) - start:.2f} s, {rate:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0
