"""Stop strings across delta boundaries, and the per-request output stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zeroserve.tokenizer_proc.detokenizer import IncrementalDetokenizer
from zeroserve.tokenizer_proc.stop_strings import StopChecker


def _feed_all(checker, deltas):
    out, result = [], (None, False, None)
    for delta in deltas:
        text, stopped, matched = checker.feed(delta)
        out.append(text)
        result = (text, stopped, matched)
        if stopped:
            break
    else:
        out.append(checker.flush())
    return "".join(out), result[1], result[2]


def test_stop_split_across_deltas():
    checker = StopChecker(["\nUser:"])
    assert checker.feed("Sure thing.\nUs") == ("Sure thing.", False, None)
    assert checker.held_text == "\nUs"
    assert checker.feed("er: next") == ("", True, "\nUser:")
    assert checker.feed("more") == ("", True, "\nUser:")  # stays stopped
    assert checker.flush() == ""


def test_split_into_single_characters():
    text, stopped, matched = _feed_all(StopChecker(["STOP"]), list("abcSTOPdef"))
    assert (text, stopped, matched) == ("abc", True, "STOP")


def test_near_match_is_released():
    checker = StopChecker(["</answer>"])
    assert checker.feed("x </ans") == ("x ", False, None)
    # "</answ" + "ers" can no longer be "</answer>": released at once, nothing held
    assert checker.feed("wers") == ("</answers", False, None)
    assert checker.held_text == ""
    # an open prefix is only the part that can still match: "a</" holds "</" only
    assert checker.feed("a</") == ("a", False, None)
    assert checker.flush() == "</"


def test_several_stop_strings_first_seen_wins():
    checker = StopChecker(["\n\n", "###", "END"])
    assert checker.feed("one ## two #") == ("one ## two ", False, None)
    assert checker.feed("##\n\nEND") == ("", True, "###")
    # the stop that completes first in the text wins, whatever its place in the list;
    # of two that complete together, the longer (it starts first)
    assert _feed_all(StopChecker(["stop", "long stop"]), ["a long st", "op"]) == ("a ", True, "long stop")
    assert _feed_all(StopChecker(["abcd", "bc"]), ["abcd"]) == ("a", True, "bc")


def test_include_stop_str_in_output():
    checker = StopChecker(["</s>", "\n"], include_stop_str_in_output=True)
    assert checker.feed("hello </") == ("hello ", False, None)
    assert checker.feed("s> tail") == ("</s>", True, "</s>")


def test_flush_releases_held_text_and_empty_stops_are_ignored():
    checker = StopChecker(["abc", ""])
    assert checker.stop == ["abc"]
    assert checker.feed("xxab") == ("xx", False, None)
    assert checker.flush() == "ab"
    assert StopChecker([]).feed("anything") == ("anything", False, None)
    assert StopChecker(None).flush() == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n#é🎉", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n#é🎉", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
    include=st.booleans(),
)
def test_result_does_not_depend_on_delta_boundaries(text, stops, cuts, include):
    """Any split of the text gives the output of feeding it whole, which is the text up to the
    stop string that ends first (or all of it)."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    streamed = _feed_all(StopChecker(stops, include), deltas)
    whole = _feed_all(StopChecker(stops, include), [text])
    assert streamed == whole
    ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if ends:
        end, start, s = min(ends)
        assert whole == (text[:end] if include else text[:start], True, s)
    else:
        assert whole == (text, False, None)


# ------------------------------------------------------- detokenizer + stop strings, as wired


def _run(tokenizer, prompt, out, stop, include=False, finish=True):
    """tokenizer_proc's per-request flow: push each token, feed its text; the last one final."""
    detok, checker, texts = IncrementalDetokenizer(tokenizer, prompt), StopChecker(stop, include), []
    for k, token_id in enumerate(out):
        final = finish and k == len(out) - 1
        text = detok.push([token_id]) + (detok.flush() if final else "")
        emit, stopped, matched = checker.feed(text, final=final)
        texts.append(emit)
        if stopped:
            return "".join(texts), k, matched
    return "".join(texts), None, None


def test_stop_on_text_across_tokens(tokenizer):
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    out = tokenizer.encode("The answer is 42 🎉.\nUser: and now?", add_special_tokens=False)
    text, stop_at, matched = _run(tokenizer, prompt, out, ["\nUser:"])
    assert (text, matched) == ("The answer is 42 🎉.", "\nUser:")
    assert tokenizer.decode(out[: stop_at + 1]).endswith("User:")  # stopped on the token completing it
    text, _, _ = _run(tokenizer, prompt, out, ["\nUser:"], include=True)
    assert text == "The answer is 42 🎉.\nUser:"


def test_final_feed_releases_held_text(tokenizer):
    out = tokenizer.encode("ends with a partial stop </ans", add_special_tokens=False)
    out += tokenizer.encode("🎉", add_special_tokens=False)[:1]  # and half a character
    text, stop_at, _ = _run(tokenizer, [], out, ["</answer>"])
    assert stop_at is None and text == tokenizer.decode(out) == "ends with a partial stop </ans\ufffd"
    unfinished, _, _ = _run(tokenizer, [], out, ["</answer>"], finish=False)
    assert unfinished == "ends with a partial stop "  # "</ans" still held, the half character too
    checker = StopChecker(["abc"])
    assert checker.feed("xab") == ("x", False, None)
    assert checker.feed("c", final=True) == ("", True, "abc")  # a stop in the last text counts
    assert StopChecker(["abc"]).feed("xab", final=True) == ("xab", False, None)


def test_stop_inside_multi_token_character(sp_tokenizer):
    """Byte-fallback "日" is three tokens: the stop string "o 日" completes on the third."""
    out = sp_tokenizer.encode("hello 日 world", add_special_tokens=False)
    text, stop_at, matched = _run(sp_tokenizer, sp_tokenizer.encode("hello"), out, ["o 日"])
    assert sp_tokenizer.id_to_token(out[stop_at]) == "<0xA5>"  # last byte of 日 (E6 97 A5)
    assert (text, matched) == (" hell", "o 日")
