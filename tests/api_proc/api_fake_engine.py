"""An in-process stand-in for zeroserve.shared.client.EngineClient, and a helper that serves
create_app over it with aiohttp's test server.

The fake "tokenizes" by whitespace, "generates" the words " t0 t1 ..." (" s{seed}_0 ..." with
a seed), honours max_tokens / stop strings / logprobs like the engine, refuses what the engine
refuses (token ids outside the vocabulary, the context length, min_tokens over max_tokens: the
API leaves those to the engine), and records every GenerateRequest, every Abort (a stream
closed before its last delta) and every ping.
Words in the prompt (or the last message) trigger failures:
    OVERLOAD -> 429 at admission        TOOLONG -> 400 prompt too long
    CRASH    -> 2 tokens, then 503      HANG    -> 1 token, then nothing (until aborted)
    SILENT   -> nothing at all          RAISE   -> the stream raises ConnectionError
    SLOW     -> 20 ms between tokens
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from aiohttp.test_utils import TestClient, TestServer

from zeroserve.api_proc.app import create_app
from zeroserve.api_proc.config import ApiConfig
from zeroserve.shared.messages import (
    DetokenizeRequest,
    EngineStatus,
    ErrorInfo,
    GenerateRequest,
    Pong,
    RequestTimings,
    SchedulerStats,
    TextDelta,
    TokenizeRequest,
    TokenizeResult,
    TokenLogprobs,
    TopLogprob,
)

MODEL = "test-model"


def word_id(word: str, vocab_size: int) -> int:
    return 100 + sum(word.encode()) % (vocab_size - 200)


class FakeEngineClient:
    def __init__(self, max_model_len: int = 64, vocab_size: int = 1000):
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.ready = True
        self.ping_fails = False
        self.stats = SchedulerStats(
            num_running=3,
            num_waiting=2,
            kv_cache_usage=0.25,
            prefix_cache_queries=1000,
            prefix_cache_hits=400,
            num_preemptions=7,
        )
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.active = 0  # streams open now
        self.pings = 0
        self.detokenized: list[list[int]] = []
        self.tokenized: list[TokenizeRequest] = []
        self.started = asyncio.Event()  # set when a HANG request has sent its token

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # ------------------------------------------------------------------ tokenizer stand-in

    def _render(self, req: GenerateRequest | TokenizeRequest) -> str:
        if req.messages is not None:
            return "\n".join(f"{m.role}: {m.content or ''}" for m in req.messages)
        return req.prompt or ""

    def _tokens(self, text: str) -> list[int]:
        return [word_id(w, self.vocab_size) for w in text.split()]

    # ------------------------------------------------------------------ the client interface

    async def ping(self, timeout: float = 1.0) -> Pong:
        self.pings += 1
        if self.ping_fails:
            raise TimeoutError("no pong")
        engine = EngineStatus(
            model_name="fake",
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            draining=False,
            bad_frames=0,
            stats=self.stats,
        )
        return Pong(sent_at=time.time(), role="tokenizer", ready=self.ready, engine=engine)

    async def ping_all(self, timeout: float = 1.0) -> list[Pong | None]:
        """One tokenizer: its Pong, or None when pings fail."""
        try:
            return [await self.ping(timeout)]
        except TimeoutError:
            return [None]

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        self.tokenized.append(req)
        if "TOOLONG" in self._render(req):
            err = ErrorInfo(400, "invalid_request_error", "The prompt is too long.", param="prompt")
            return TokenizeResult(request_id=req.request_id, error=err)
        return TokenizeResult(
            request_id=req.request_id,
            token_ids=self._tokens(self._render(req)),
            max_model_len=self.max_model_len,
        )

    async def detokenize(self, req: DetokenizeRequest) -> TokenizeResult:
        self.detokenized.append(list(req.token_ids))
        bad = [t for t in req.token_ids if not 0 <= t < self.vocab_size]
        if bad:
            message = f"Token id {bad[0]} in tokens is outside the vocabulary [0, {self.vocab_size})."
            err = ErrorInfo(400, "invalid_request_error", message, param="tokens")
            return TokenizeResult(request_id=req.request_id, error=err)
        return TokenizeResult(request_id=req.request_id, text=" ".join(f"<{t}>" for t in req.token_ids))

    def stream(self, req: GenerateRequest):
        self.requests.append(req)
        return self._generate(req)

    async def _generate(self, req: GenerateRequest):
        rid, p = req.request_id, req.params
        done = False
        self.active += 1

        def error(status: int, kind: str, message: str, param: str | None = None) -> TextDelta:
            return TextDelta(
                request_id=rid,
                text="",
                finish_reason="error",
                error=ErrorInfo(status, kind, message, param=param),
            )

        try:
            for param, ids in (("prompt", req.prompt_token_ids or []), ("stop_token_ids", p.stop_token_ids)):
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    done = True
                    yield error(
                        400,
                        "invalid_request_error",
                        f"Token id {bad[0]} in {param} is outside the vocabulary [0, {self.vocab_size}).",
                        param,
                    )
                    return
            if req.prompt_token_ids is not None:
                prompt_ids = list(req.prompt_token_ids)
                prompt_text = " ".join(f"<{t}>" for t in prompt_ids)
            else:
                prompt_text = self._render(req)
                prompt_ids = self._tokens(prompt_text)
            if "SILENT" in prompt_text:
                await asyncio.Event().wait()
            if "RAISE" in prompt_text:
                raise ConnectionError("engine socket gone")
            if "OVERLOAD" in prompt_text:
                done = True
                yield error(429, "rate_limit_error", "The engine's queue is full; retry later.")
                return
            max_tokens = p.max_tokens
            if max_tokens <= 0:  # "the rest of the context", as tokenizer_proc resolves it
                max_tokens = self.max_model_len - len(prompt_ids)
            if "TOOLONG" in prompt_text or len(prompt_ids) + max_tokens > self.max_model_len:
                done = True
                yield error(
                    400,
                    "invalid_request_error",
                    f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                    f"{len(prompt_ids)} and {p.max_tokens} more were asked for.",
                    "max_tokens",
                )
                return
            if p.min_tokens > max_tokens:
                done = True
                yield error(
                    400,
                    "invalid_request_error",
                    f"min_tokens must be between 0 and max_tokens, got {p.min_tokens}.",
                    "min_tokens",
                )
                return
            tag = f"s{p.seed}_" if p.seed is not None else "t"
            full, emitted = "", 0
            for k in range(max_tokens):
                if "SLOW" in prompt_text:
                    await asyncio.sleep(0.02)
                if "CRASH" in prompt_text and k == 2:
                    done = True
                    yield error(503, "server_error", "A worker died; the request was aborted.")
                    return
                piece = f" {tag}{k}"
                full += piece
                first = k == 0
                extra = {}
                if first:
                    extra = {"num_prompt_tokens": len(prompt_ids), "num_cached_tokens": 0}
                    if req.return_prompt:
                        extra.update(prompt_token_ids=prompt_ids, prompt_text=prompt_text)
                if p.logprobs is not None:
                    top = [TopLogprob(token_id=900 + r, logprob=-1.0 - r) for r in range(p.logprobs)]
                    extra.update(
                        logprobs=[TokenLogprobs(logprob=-0.5, top=top)],
                        token_texts=[piece],
                        top_token_texts=[[f"<{a.token_id}>" for a in top]],
                    )
                # the scheduler's phases: so far on the first token, all on the last delta of a
                # request it ended (a stop string ends it in the tokenizer: none then)
                so_far = RequestTimings(0.001, 0.002, 0.0, 0.002) if first else None
                hits = [(full.find(s), s) for s in req.stop if s in full]
                if hits:
                    pos, s = min(hits)
                    cut = pos + len(s) if req.include_stop_str_in_output else pos
                    done = True
                    yield TextDelta(
                        request_id=rid,
                        text=full[emitted:cut],
                        token_ids=[5 + k],
                        finish_reason="stop",
                        stop_reason=s,
                        num_output_tokens=k + 1,
                        timings=so_far,
                        **extra,
                    )
                    return
                last = k == max_tokens - 1
                done = last
                yield TextDelta(
                    request_id=rid,
                    text=full[emitted:],
                    token_ids=[5 + k],
                    finish_reason="length" if last else None,
                    num_output_tokens=k + 1,
                    timings=RequestTimings(0.001, 0.002, 0.003 * k, 0.002 + 0.003 * k) if last else so_far,
                    **extra,
                )
                emitted = len(full)
                if "HANG" in prompt_text:
                    self.started.set()
                    await asyncio.Event().wait()
        finally:
            self.active -= 1
            (self.finished if done else self.aborted).append(rid)


def make_config(**overrides) -> ApiConfig:
    values = {"engine_address": "inproc://fake", "model_name": MODEL, "ping_interval_s": 0.2}
    values.update(overrides)
    return ApiConfig(**values)


@asynccontextmanager
async def api_client(fake: FakeEngineClient | None = None, **overrides):
    """A TestClient over create_app(make_config(**overrides), fake); .fake is the engine."""
    fake = fake or FakeEngineClient()
    app = create_app(make_config(**overrides), fake)
    async with TestClient(TestServer(app)) as client:
        client.fake = fake
        yield client


async def sse_events(resp) -> list:
    """The JSON payloads of an SSE body, with the final "[DONE]" as the string itself."""
    import json

    body = (await resp.read()).decode()
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
