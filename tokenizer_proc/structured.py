"""Admission of constrained requests: a schema, regex or grammar xgrammar cannot read is a 400
that says why, here, before the request reaches the scheduler (the worker then only compiles
what is known to parse).

Runs on the tokenizer's worker thread (build_prompt), never on its event loop: xgrammar builds
the grammar in C++ (a large schema takes milliseconds). Verdicts are cached by hash of
(kind, spec), so the n choices of one request, and every later request with the same schema,
are checked once; the cache is an LRU bounded in entries (a verdict is a few bytes).

Importing xgrammar imports torch: seconds, with single C calls that hold the GIL for most of
one, long enough for the event loop to miss heartbeats. So the process imports it once at
start (``preload``, on a side thread, while the worker is still loading the model), never
in the middle of serving; it costs each tokenizer process ~200 MB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from zeroserve.shared.messages import StructuredOutput
from zeroserve.shared.structured_grammar import GrammarSpecError, build_grammar, grammar_key, param_of

from .errors import TokenizerError


class StructuredCheck:
    """check(so) raises TokenizerError (400) for a spec xgrammar refuses. Not thread-safe: the
    tokenizer's one worker thread uses it."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._verdicts: OrderedDict[bytes, str | None] = OrderedDict()  # key -> error message or None
        self.hits = 0

    def check(self, so: StructuredOutput | None) -> None:
        if so is None:
            return
        key = grammar_key(so)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            self.hits += 1
            error = self._verdicts[key]
        else:
            error = None
            try:
                build_grammar(so)
            except GrammarSpecError as e:
                error = str(e)
            self._verdicts[key] = error
            if len(self._verdicts) > self.max_entries:
                self._verdicts.popitem(last=False)
        if error is not None:
            raise TokenizerError(f"Invalid {_NAMES.get(so.kind, so.kind)}: {error}", param=param_of(so.kind))


_NAMES = {
    "json": "JSON schema",
    "json_object": "json_object constraint",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar (EBNF)",
    "structural_tag": "structural tag",
}


# the process's one cache: build_prompt runs on the tokenizer's single worker thread
_CHECK = StructuredCheck()


def check_structured(so: StructuredOutput | None) -> None:
    """Raise TokenizerError (400, naming the field) when ``so`` cannot be decoded with."""
    _CHECK.check(so)


def preload() -> threading.Thread:
    """Import xgrammar now, on a side thread: a first constrained request then finds it loaded
    (its check waits on the import lock if it comes before the import is done)."""

    def load() -> None:
        try:
            import xgrammar  # noqa: F401
        except ImportError:  # not installed: every constrained request then gets a 400 saying so
            pass

    thread = threading.Thread(target=load, name="xgrammar-import", daemon=True)
    thread.start()
    return thread
