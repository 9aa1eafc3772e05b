"""Stop strings found across token and delta boundaries.

The detokenizer hands over text piece by piece; a stop string may arrive split
("...<|us" + "er|>"). StopChecker keeps back the shortest tail that could still begin a stop
string, so no text after a stop ever reaches the client, and releases that tail as soon as
the next text shows it cannot match (or at flush, when the request ends otherwise)::

    checker = StopChecker(["\\nUser:"], include_stop_str_in_output=False)
    checker.feed("Sure.\\nUs")   -> ("Sure.", False, None)     "\\nUs" held back
    checker.feed("er: hi")      -> ("", True, "\\nUser:")     cut before the stop string

A request that ends for another reason passes its last text with final=True (or calls
flush()) to get the held tail back.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """One request's stop strings. After a stop, feed() returns ("", True, stop) for good."""

    def __init__(self, stop: Sequence[str] | None, include_stop_str_in_output: bool = False):
        self.stop = [s for s in dict.fromkeys(stop or ()) if s]  # "" would match everywhere
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def held_text(self) -> str:
        return self._held

    def feed(self, text: str, final: bool = False) -> tuple[str, bool, str | None]:
        """New text in -> (text to emit now, stopped, the stop string matched or None).

        final: this is the request's last text (it ended for another reason): a stop string
        in it still counts, and otherwise the held tail is released too.
        """
        if self.matched is not None:
            return "", True, self.matched
        if final:
            emit, stopped, matched = self.feed(text)
            return (emit, True, matched) if stopped else (emit + self.flush(), False, None)
        if not self.stop:
            return text, False, None
        buf = self._held + text
        # The match that ENDS first wins (ties: the one starting first): that is the first stop
        # string a reader of the stream sees complete, so the result does not depend on how the
        # text was cut into deltas.
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            self.matched, self._held = s, ""
            return buf[:end] if self.include_stop_str_in_output else buf[:start], True, s
        keep = self._open_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False, None

    def flush(self) -> str:
        """The held tail, when the request ends without a stop string."""
        if self.matched is not None:
            return ""
        text, self._held = self._held, ""
        return text

    def _open_suffix(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:k]):
                    longest = k
                    break
        return longest
