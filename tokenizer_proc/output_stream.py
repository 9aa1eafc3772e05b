"""One request's output, token ids in, client text out: detokenize, then cut at stop strings.

    stream = OutputStream(tok, prompt_ids, stop=["\\n\\n"], include_stop_str_in_output=False)
    step = stream.push(delta.token_ids)      # StreamStep(text, stopped, stop_str)
    if step.stopped: abort upstream, finish with finish_reason "stop", stop_reason step.stop_str
    tail = stream.finish()                   # when the scheduler finished it (eos, length, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .detokenizer import IncrementalDetokenizer
from .stop_strings import StopChecker
from .tokenizer import Tokenizer


class StreamStep(NamedTuple):
    text: str
    stopped: bool = False
    stop_str: str | None = None


class OutputStream:
    """Detokenizer + stop checker of one request. Text already emitted is never taken back."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), stop: Sequence[str] | None = None,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.stop_checker = StopChecker(stop, include_stop_str_in_output)
        self.text = ""  # everything emitted so far

    @property
    def stopped(self) -> bool:
        return self.stop_checker.stopped

    def push(self, token_ids: Sequence[int]) -> StreamStep:
        """Text the new ids finish, cut at (or through) the first stop string."""
        if self.stopped:
            return StreamStep("", True, self.stop_checker.matched)
        text, stopped, stop_str = self.stop_checker.feed(self.detokenizer.push(token_ids))
        self.text += text
        return StreamStep(text, stopped, stop_str)

    def finish(self) -> StreamStep:
        """The request ended (eos, length, abort): release held characters and held stop-string
        prefixes. A stop string completed by the very last characters still counts."""
        if self.stopped:
            return StreamStep("", True, self.stop_checker.matched)
        text, stopped, stop_str = self.stop_checker.feed(self.detokenizer.flush())
        if not stopped:
            text += self.stop_checker.flush()
        self.text += text
        return StreamStep(text, stopped, stop_str)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each id decoded on its own, for OpenAI logprobs."""
        return [self.tokenizer.token_text(i) for i in token_ids]
