"""Running a GenerationPlan against the engine: one stream per choice, merged in arrival order.

``EngineStreams`` owns the engine streams of one HTTP request. Leaving its ``async with``
for any reason (done, error, client gone, handler cancelled) cancels the streams still
running, and closing an engine stream early sends Abort, so the engine frees the blocks.
Transport trouble (an exception from the client, a stream that ends unfinished, an engine
silent past the stall timeout) becomes an error TextDelta, so handlers have one error path.

``ChoiceState`` accumulates one choice (text, token counts, logprobs, finish) and records
its latency metrics as deltas arrive.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple

from zeroserve.api_proc.metrics import ApiMetrics, ParentRequest
from zeroserve.shared.messages import ErrorInfo, GenerateRequest, RequestTimings, TextDelta

log = logging.getLogger("zeroserve.api")


def _lost(request_id: str, why: str) -> TextDelta:
    info = ErrorInfo(
        status=503, type="server_error", message=f"{why}; retry the request.", code="engine_unavailable"
    )
    return TextDelta(request_id=request_id, text="", finish_reason="error", error=info)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # the stream is being dropped; its own errors no longer matter
            log.debug("closing an engine stream failed", exc_info=True)


class EngineStreams:
    """``async with EngineStreams(...) as s: async for choice_index, delta in s: ...``

    Iteration ends once every choice has had its last delta (finish_reason or error). The
    first delta of a request may take as long as its queue deadline (first_timeout_s, None:
    no limit); after that, a gap over stall_timeout_s means the engine lost the request.
    """

    def __init__(
        self,
        client: Any,
        requests: list[GenerateRequest],
        first_timeout_s: float | None,
        stall_timeout_s: float,
    ):
        self.client = client
        self.requests = requests
        self.first_timeout_s = first_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.queue: asyncio.Queue[tuple[int, TextDelta]] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.remaining = len(requests)

    async def __aenter__(self) -> EngineStreams:
        self.tasks = [asyncio.ensure_future(self._pump(i, r)) for i, r in enumerate(self.requests)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        running = [t for t in self.tasks if not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    def __aiter__(self) -> EngineStreams:
        return self

    async def __anext__(self) -> tuple[int, TextDelta]:
        if self.remaining == 0:
            raise StopAsyncIteration
        index, delta = await self.queue.get()
        if delta.finish_reason is not None or delta.error is not None:
            self.remaining -= 1
        return index, delta

    async def _pump(self, index: int, request: GenerateRequest) -> None:
        loop = asyncio.get_running_loop()
        first = (
            None
            if self.first_timeout_s is None
            else loop.time() + self.first_timeout_s + self.stall_timeout_s
        )
        stream = None
        try:
            async with asyncio.timeout_at(first) as guard:
                stream = self.client.stream(request)
                async for delta in stream:
                    self.queue.put_nowait((index, delta))
                    if delta.finish_reason is not None or delta.error is not None:
                        return
                    guard.reschedule(loop.time() + self.stall_timeout_s)
            self.queue.put_nowait(
                (index, _lost(request.request_id, "The engine ended the request unfinished"))
            )
        except TimeoutError:
            log.warning("request %s: no word from the engine in time; aborting it", request.request_id)
            self.queue.put_nowait((index, _lost(request.request_id, "The engine did not answer in time")))
        except Exception as e:
            log.warning("request %s: engine stream failed: %s: %s", request.request_id, type(e).__name__, e)
            self.queue.put_nowait((index, _lost(request.request_id, "The engine is unavailable")))
        finally:
            if stream is not None:
                await _aclose(stream)


# --------------------------------------------------------------------------- per choice


class LogprobEntry(NamedTuple):
    """One output token for OpenAI logprobs: its text, logprob, the top alternatives as
    (text, logprob), and its character offset in the choice's text (completions)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int


class ChoiceState:
    def __init__(
        self,
        index: int,
        arrival: float,
        metrics: ApiMetrics | None,
        counts_prompt: bool,
        echo_text: str | None = None,
        echo: bool = False,
        parent: ParentRequest | None = None,
    ):
        self.index = index
        self.parent = parent  # the prompt's n choices, for the per-request metrics
        self.arrival = arrival
        self.metrics = metrics
        self.counts_prompt = counts_prompt  # the first choice of a prompt carries its prompt tokens
        self.echo = echo
        self.echo_fallback = echo_text
        self.text: list[str] = []
        self.logprobs: list[LogprobEntry] = []
        self.num_prompt_tokens = 0
        self.num_tokens = 0  # output tokens seen in deltas
        self.num_output_tokens = 0  # the engine's own count, when it sends one
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.replica: str | None = None  # the engine replica that served it
        self.first_token_at: float | None = None  # monotonic, for the request's TTFT
        self.timings: RequestTimings | None = None  # the engine's phases, latest known
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.offset = 0  # characters of text so far (logprobs text_offset)
        self.tools: Any = None  # a chat with tools: the choice's api_proc.tools.ToolStream, when streamed
        self._heard = False
        self._last_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return max(self.num_tokens, self.num_output_tokens)

    def apply(self, delta: TextDelta, now: float) -> str:
        """Take one delta; returns the text it adds to the choice (with the echoed prompt first)."""
        text = delta.text
        if not self._heard:
            self._heard = True
            if self.echo:
                text = (
                    delta.prompt_text if delta.prompt_text is not None else self.echo_fallback or ""
                ) + text
        if delta.num_prompt_tokens:
            self.num_prompt_tokens = delta.num_prompt_tokens
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.replica is not None:
            self.replica = delta.replica
        if delta.timings is not None:
            self.timings = delta.timings
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        if delta.token_ids:
            self.num_tokens += len(delta.token_ids)
            if self.first_token_at is None:
                self.first_token_at = now
            if self.metrics is not None:
                if self._last_token_at is None:
                    self.metrics.first_token(self.arrival, now)
                    if len(delta.token_ids) > 1:
                        self.metrics.tokens_after_gap(0.0, len(delta.token_ids) - 1)
                else:
                    self.metrics.tokens_after_gap(now - self._last_token_at, len(delta.token_ids))
            self._last_token_at = now
        if delta.finish_reason is not None and delta.error is None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            if self.metrics is not None:
                self.metrics.finished(
                    self.arrival,
                    now,
                    delta.finish_reason,
                    self.num_prompt_tokens if self.counts_prompt else 0,
                    self.completion_tokens,
                    timings=delta.timings,
                    started=self.timings,
                    cached_tokens=self.num_cached_tokens if self.counts_prompt else 0,
                    first_token_at=self.first_token_at,
                    parent=self.parent,
                )
        self.text.append(text)
        self.offset += len(text)
        return text


def logprob_entries(delta: TextDelta, offset: int) -> list[LogprobEntry]:
    """The delta's tokens with their logprobs; offset: characters of the choice so far.

    The texts come with the delta: tokenizer_proc fills token_texts and top_token_texts
    whenever it sends logprobs."""
    if not delta.logprobs:
        return []
    entries = []
    for token, lp, alt_texts in zip(delta.token_texts, delta.logprobs, delta.top_token_texts or []):
        entries.append(
            LogprobEntry(token, lp.logprob, [(t, a.logprob) for t, a in zip(alt_texts, lp.top)], offset)
        )
        offset += len(token)
    return entries
