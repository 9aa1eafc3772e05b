"""Per-request work in tokenizer_proc: turning a request's tokens into text (the prompt is
built and checked in validation.py)."""

from __future__ import annotations

from zeroserve.shared.messages import EngineRequest, GenerateRequest, TextDelta, TokenDelta
from zeroserve.tokenizer_proc.detokenizer import IncrementalDetokenizer
from zeroserve.tokenizer_proc.stop_strings import StopChecker


class RequestState:
    """Detokenizer, stop strings and counters of one request in flight."""

    def __init__(
        self,
        tokenizer,
        owner: bytes,
        req: GenerateRequest,
        prompt_ids: list[int],
        engine_request: EngineRequest | None = None,
        replica: str = "",
    ):
        self.tokenizer = tokenizer
        self.owner = owner
        self.req = req
        self.prompt_ids = prompt_ids
        self.engine_request = engine_request  # as sent: re-sent as is if its replica fails it
        self.replica = replica  # the replica serving it: only its deltas count, aborts go there
        self.resent = False  # re-sent once already (a second failure reaches the owner)
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=req.skip_special_tokens
        )
        self.stop = StopChecker(req.stop, req.include_stop_str_in_output) if req.stop else None
        self.num_output = 0
        self.first = True

    def advance(self, delta: TokenDelta) -> TextDelta:
        first, self.first = self.first, False
        extra = {}
        if first:
            extra = {
                "num_prompt_tokens": delta.num_prompt_tokens or len(self.prompt_ids),
                "num_cached_tokens": delta.num_cached_tokens,
                "replica": self.replica or None,
            }
            if self.req.return_prompt:
                extra["prompt_token_ids"] = self.prompt_ids
                extra["prompt_text"] = self.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
        if delta.error is not None:
            extra["replica"] = self.replica or None
            return TextDelta(
                request_id=delta.request_id,
                text="",
                finish_reason=delta.finish_reason or "error",
                error=delta.error,
                timings=delta.timings,
                num_output_tokens=self.num_output,
                **extra,
            )
        self.num_output += len(delta.token_ids)
        finished = delta.finish_reason is not None
        if finished:
            extra["replica"] = self.replica or None
        text = self.detok.push(delta.token_ids)
        if finished:
            text += self.detok.flush()
        finish_reason, stop_reason = delta.finish_reason, delta.stop_reason
        if self.stop is not None:
            text, stopped, matched = self.stop.feed(text, final=finished)
            if stopped:
                finish_reason, stop_reason = "stop", matched
        if self.req.params.logprobs is not None and delta.logprobs:
            extra["logprobs"] = delta.logprobs
            extra["token_texts"] = [self.detok.token_text(t) for t in delta.token_ids]
            extra["top_token_texts"] = [
                [self.detok.token_text(t.token_id) for t in lp.top] for lp in delta.logprobs
            ]
        return TextDelta(
            request_id=delta.request_id,
            text=text,
            token_ids=delta.token_ids,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            timings=delta.timings,  # the scheduler's: first token (so far) and last, unless a stop string
            num_output_tokens=self.num_output,
            embedding=delta.embedding,  # an embedding request's vector, on its one delta
            **extra,
        )
