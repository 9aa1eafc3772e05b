"""Incremental detokenization: the text of each new token, never half a UTF-8 character.

Decoding token by token is wrong twice: a character may span several byte-level tokens
(each alone decodes to "\\ufffd"), and SentencePiece decoders treat a sequence's first token
specially (strip its leading space). So each step decodes a short window of ids twice and
diffs, as vLLM/TGI do::

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                [  already emitted  ]  [ new, not yet emitted ]
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    emit new_text[len(prefix_text):] unless it ends in "\\ufffd" (an unfinished character):
    then hold the new ids back until a later token completes it.

The window is the last released chunk plus the held ids, so a step costs O(1), not O(n).
Starting with the prompt's last ids in the window gives the first output token its real
context (a SentencePiece "▁Hello" after a prompt is " Hello", not "Hello").

Invariant (tested): decode(prompt + output) == decode(prompt) + "".join(pushes) + flush(),
and with an empty prompt the concatenation is decode(output).
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

# prompt ids decoded with the first output token, as context (vLLM uses 5 as well)
_PROMPT_CONTEXT = 5
# ids held back at most: a UTF-8 character is <= 4 bytes and a token >= 1 byte, so a valid
# character completes within 4 tokens; beyond that the model wrote invalid UTF-8 (or a real
# U+FFFD) and we release it rather than grow the window forever
_MAX_HELD = 8
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one request's output, token by token. Not thread-safe; one per request."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:]) if prompt_token_ids else []
        # Only the window is kept: ids[0] is the first id of the prefix window.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.num_output_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append sampled ids; return the text they finish (maybe "", while a character is open)."""
        if not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        self.num_output_tokens += len(new_token_ids)
        return self._release(force=False)

    def flush(self) -> str:
        """At the end of the request: whatever is still held back (an unfinished character
        decodes to "\\ufffd", exactly as a full decode would)."""
        return self._release(force=True)

    @property
    def has_pending(self) -> bool:
        """Whether ids are held back waiting for the rest of a character."""
        return len(self._ids) > self._read_offset

    def _release(self, force: bool) -> str:
        ids, prefix, read = self._ids, self._prefix_offset, self._read_offset
        if len(ids) == read:
            return ""
        prefix_text = self._decode(ids[prefix:read])
        new_text = self._decode(ids[prefix:])
        held = len(ids) - read
        if not force and held < _MAX_HELD and (new_text.endswith(_REPLACEMENT) or len(new_text) < len(prefix_text)):
            return ""
        # ids[prefix:read] ended on a character boundary when it was released, so the new
        # window's text starts with the old one; the slice is the new text.
        delta = new_text[len(prefix_text):]
        # Keep only the just-released chunk as the next prefix window (bounded memory and work).
        self._ids = ids[read:]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta


def detokenize(tokenizer: Tokenizer, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
               skip_special_tokens: bool = True) -> str:
    """The output text all at once, equal to the streamed concatenation."""
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
    return detok.push(output_token_ids) + detok.flush()
