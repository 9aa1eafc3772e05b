"""A naive baseline server: Hugging Face transformers, ONE request at a time.

It answers enough of the OpenAI API for `zeroserve bench` (/v1/completions and
/v1/chat/completions with SSE streaming and usage, /v1/models, /health) and decodes token by
token with a KV cache, one request after another behind an asyncio.Lock: the "no batching,
no paging" floor that a serving engine should beat as soon as two requests overlap.

    python benchmarks/baselines/hf_server.py [MODEL] [--port 8001] [--threads N]

MODEL is a Hugging Face folder or a GGUF file (transformers dequantizes it to float32);
default: the SmolLM2 GGUF packaged for zeroserve. Honours max_tokens, temperature, top_p,
seed, stop, ignore_eos and min_tokens; other fields are accepted and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
import time
import uuid

import torch
from aiohttp import web


def load(model_path: str):
    """(model, tokenizer) from an HF folder or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(model_path) and model_path.endswith(".gguf"):
        folder, kw = os.path.dirname(os.path.abspath(model_path)), {"gguf_file": os.path.basename(model_path)}
    elif os.path.isdir(model_path):
        folder, kw = model_path, {}
    else:
        sys.exit(f"hf_server: {model_path} is neither a GGUF file nor a Hugging Face folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    return model, tokenizer


class Generator:
    """Token-by-token decoding of one request with incremental detokenization."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_len = getattr(model.config, "max_position_embeddings", 2048)
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forward_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def encode_prompt(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list")
            if self.tokenizer.chat_template:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                return self.tokenizer.encode(text, add_special_tokens=False)
            text = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages) + "assistant:"
            return self.tokenizer.encode(text)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string, a list of one string or a list of token ids")
        return self.tokenizer.encode(prompt)

    @torch.inference_mode()
    def step(self, state: dict) -> int:
        """One forward (the whole prompt first, then one token) and one sampled token id."""
        ids = state["pending"]
        kw = {self.cache_kw: state.get("cache"), **self.forward_kw}
        out = self.model(torch.tensor([ids]), use_cache=True, **kw)
        state["cache"] = out["cache"] if "cache" in out else out["past_key_values"]
        logits = out.logits[0, -1].float()
        if len(state["generated"]) < state["min_tokens"] and not state["ignore_eos"]:
            logits[list(self.eos_ids)] = float("-inf")
        if state["temperature"] <= 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / state["temperature"], dim=-1)
            if state["top_p"] < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < state["top_p"]
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=state["rng"]))
        state["generated"].append(token)
        state["pending"] = [token]
        return token


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.json_response(body, status=status)


class Server:
    def __init__(self, gen: Generator, model_name: str):
        self.gen, self.model_name = gen, model_name
        self.lock = asyncio.Lock()  # one request at a time: this is the point of the baseline

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", lambda r: self.complete(r, chat=False))
        app.router.add_post("/v1/chat/completions", lambda r: self.complete(r, chat=True))
        return app

    async def models(self, request):
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "hf_server"}
        return web.json_response({"object": "list", "data": [card]})

    def _state(self, body: dict, prompt_ids: list[int]) -> dict:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("'max_tokens' must be a positive integer")
        if len(prompt_ids) + max_tokens > self.gen.max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.gen.max_len}"
            )
        stop = body.get("stop") or []
        rng = torch.Generator()
        rng.manual_seed(int(body["seed"]) if body.get("seed") is not None else int(time.time_ns() % 2**31))
        return {
            "pending": prompt_ids,
            "generated": [],
            "max_tokens": max_tokens,
            "temperature": float(
                body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0
            ),
            "top_p": float(body.get("top_p") or 1.0),
            "ignore_eos": bool(body.get("ignore_eos")),
            "min_tokens": int(body.get("min_tokens") or 0),
            "stop": [stop] if isinstance(stop, str) else list(stop),
            "rng": rng,
        }

    async def complete(self, request: web.Request, chat: bool):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt_ids = self.gen.encode_prompt(body, chat)
            state = self._state(body, prompt_ids)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            return _error(400, str(e))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        meta = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        async with self.lock:
            if not body.get("stream"):
                text, finish = "", None
                async for delta, finish in self._generate(state):  # noqa: B007 (finish: the last one)
                    text += delta
                usage = self._usage(prompt_ids, state)
                choice = {"index": 0, "finish_reason": finish, "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                meta["object"] = "chat.completion" if chat else "text_completion"
                return web.json_response({**meta, "choices": [choice], "usage": usage})
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            try:
                if chat:
                    await self._send(
                        resp,
                        meta,
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                        include_usage,
                    )
                async for delta, finish in self._generate(state):
                    piece = {"delta": {"content": delta}} if chat else {"text": delta, "logprobs": None}
                    await self._send(
                        resp, meta, {"index": 0, **piece, "finish_reason": finish}, include_usage
                    )
                if include_usage:
                    await resp.write(
                        self._event({**meta, "choices": [], "usage": self._usage(prompt_ids, state)})
                    )
                await resp.write(b"data: [DONE]\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                pass  # the client left: stop generating, free the lock
            return resp

    async def _generate(self, state: dict):
        """Yields (text delta, finish_reason or None); the last item carries the reason."""
        loop = asyncio.get_running_loop()
        emitted = ""
        while True:
            token = await loop.run_in_executor(None, self.gen.step, state)
            generated = state["generated"]
            finish = None
            if token in self.gen.eos_ids and not state["ignore_eos"]:
                generated.pop()  # the EOS token is not part of the text nor of the count
                finish = "stop"
            elif len(generated) >= state["max_tokens"]:
                finish = "length"
            text = self.gen.tokenizer.decode(generated, skip_special_tokens=True)
            hit = next((s for s in state["stop"] if s and s in text), None)
            if hit:
                text, finish = text[: text.index(hit)], "stop"
            if text.endswith("\ufffd") and finish is None:
                continue  # half a UTF-8 character: wait for the rest
            delta, emitted = text[len(emitted) :], text
            if delta or finish:
                yield delta, finish
            if finish:
                return

    @staticmethod
    def _usage(prompt_ids: list[int], state: dict) -> dict:
        n = len(state["generated"])
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

    @staticmethod
    def _event(obj: dict) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def _send(self, resp, meta: dict, choice: dict, include_usage: bool) -> None:
        chunk = {**meta, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last
        await resp.write(self._event(chunk))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="HF folder or GGUF file (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--served-model-name", default=None, help="the id in /v1/models (default: from the path)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from zeroserve.shared.model_files import model_display_name, resolve_model

    path = resolve_model(args.model)
    model, tokenizer = load(path)
    server = Server(Generator(model, tokenizer), args.served_model_name or model_display_name(path))
    print(f"hf_server: serving {server.model_name} on http://{args.host}:{args.port}", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    # Shut down gracefully above; skip the interpreter teardown, which with torch loaded
    # takes seconds on a busy machine and has nothing left to save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
