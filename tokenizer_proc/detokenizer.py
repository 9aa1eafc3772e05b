"""Incremental detokenization: the text of each new token, never half a UTF-8 character.

Decoding token by token is wrong twice: a character may span several byte-level tokens
(each alone decodes to "\\ufffd"), and SentencePiece decoders treat a sequence's first token
specially (strip its leading space). So each new id decodes a short window of ids twice and
diffs, as vLLM/TGI do::

    window: [ prefix ids (released last time) | held ids (not yet released) | new id ]
    prefix_text = decode(prefix ids)
    new_text    = decode(whole window)
    release new_text[len(prefix_text):] once the window ends on a character boundary, then
    the released ids become the next prefix.

When is the window on a character boundary?
- byte-level BPE (GPT-2 / Llama 3 / Qwen / SmolLM vocabularies): when a UTF-8 decoder fed the
  tokens' raw bytes has nothing buffered, or when the next token's first byte cannot continue
  what it has buffered (invalid UTF-8 from the model: a U+FFFD either way). So cuts fall where
  a full decode cuts too and the pieces add up to decode(all ids), invalid output included.
- other decoders (SentencePiece byte fallback, ...): when new_text does not end in "\\ufffd";
  after _MAX_HELD ids the window is released anyway (invalid UTF-8 or a literal U+FFFD), which
  keeps the work bounded at the price of exactness on such invalid output.

Each id costs two decodes of a few ids: O(1), not O(n). Starting with the prompt's last ids
in the window gives the first output token its real context (SentencePiece "▁Hello" after a
prompt is " Hello", not "Hello").

Invariant (tested): decode(prompt + output) == decode(prompt) + "".join(pushes) + flush(),
and with an empty prompt the concatenation is decode(output).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from .tokenizer import Tokenizer

# prompt ids decoded with the first output token, as context (vLLM uses 5 as well)
_PROMPT_CONTEXT = 5
# ids held back at most: a UTF-8 character has <= 4 bytes and a token >= 1 byte, so a valid
# character completes within 4 ids (zero-byte ids, e.g. skipped special tokens, aside)
_MAX_HELD = 8
_REPLACEMENT = "\ufffd"


def _fresh_decode(data: bytes) -> str:
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data)


class IncrementalDetokenizer:
    """Text of one request's output, token by token. Not thread-safe; one per request."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:]) if prompt_token_ids else []
        # Only the window is kept: ids[:read_offset] is the prefix, ids[read_offset:] is held.
        self._ids: list[int] = context
        self._read_offset = len(context)
        # Tracks the raw bytes of byte-level tokens: a non-empty buffer = an open character.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tokenizer.is_byte_level else None
        self.num_output_tokens = 0

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own, special tokens included (OpenAI logprobs)."""
        return self.tokenizer.token_text(token_id)

    @property
    def has_pending(self) -> bool:
        """Whether ids are held back waiting for the rest of a character."""
        return len(self._ids) > self._read_offset

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append sampled ids; return the text they finish (maybe "", while a character is open)."""
        pieces = [self._step(token_id) for token_id in new_token_ids]
        self.num_output_tokens += len(new_token_ids)
        return "".join(pieces)

    def flush(self) -> str:
        """At the end of the request: whatever is still held back (an unfinished character
        decodes to "\\ufffd", exactly as a full decode would)."""
        if self._utf8 is not None:
            self._utf8.reset()
        return self._release(*self._texts()) if self.has_pending else ""

    def _step(self, token_id: int) -> str:
        # One id at a time, so "held" counts the ids of the one open character, not chunks
        # of finished text that happened to end mid-character.
        if self._utf8 is not None:
            return self._step_bytes(token_id)
        self._ids.append(token_id)
        prefix_text, new_text = self._texts()
        held = len(self._ids) - self._read_offset
        if held < _MAX_HELD and (new_text.endswith(_REPLACEMENT) or len(new_text) < len(prefix_text)):
            return ""
        return self._release(prefix_text, new_text)

    def _step_bytes(self, token_id: int) -> str:
        skipped = self.skip_special_tokens and token_id in self.tokenizer.special_token_ids
        data = b"" if skipped else self.tokenizer.token_bytes(token_id)
        out = ""
        open_bytes = self._utf8.getstate()[0]
        if open_bytes and data and _REPLACEMENT in _fresh_decode(open_bytes + data[:1]):
            # This token cannot continue the open character: the open bytes will be a
            # U+FFFD whatever comes next, so everything held so far is final text.
            out = self._release(*self._texts())
        self._ids.append(token_id)
        self._utf8.decode(data)
        if not self._utf8.getstate()[0] or len(self._ids) - self._read_offset >= _MAX_HELD:
            out += self._release(*self._texts())
        return out

    def _texts(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.backend.decode, self.skip_special_tokens
        return decode(self._ids[: self._read_offset], skip_special_tokens=skip), decode(
            self._ids, skip_special_tokens=skip
        )

    def _release(self, prefix_text: str, new_text: str) -> str:
        # The prefix ended on a character boundary when it was released, so the window's text
        # starts with the prefix's text; what follows is new.
        delta = new_text[len(prefix_text) :]
        self._ids = self._ids[self._read_offset :]  # the released ids are the next prefix
        self._read_offset = len(self._ids)
        return delta


def detokenize(
    tokenizer: Tokenizer,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    skip_special_tokens: bool = True,
) -> str:
    """The output text all at once, equal to the streamed concatenation."""
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
    return detok.push(output_token_ids) + detok.flush()
