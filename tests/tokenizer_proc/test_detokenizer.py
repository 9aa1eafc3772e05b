"""Incremental detokenization: no half characters, and the pieces add up to the full decode."""

from __future__ import annotations

import random

import pytest

from zeroserve.tokenizer_proc.detokenizer import IncrementalDetokenizer, detokenize

MULTI_TOKEN_TEXTS = [
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️ done",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "accents café naïve Ångström, maths ∑∫√∞ ≠ ≤, arrows ⟶ ⇒",
    "mixed: def f(x):\n    return '🐍' * x  # 蛇\n",
]


def _stream(detok, ids, rng, max_chunk=3):
    """Push ids in random chunks; return the pieces (flush last)."""
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        pieces.append(detok.push(ids[i : i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", MULTI_TOKEN_TEXTS)
def test_multi_token_characters_never_split(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode()) // 4  # really several tokens per character somewhere
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"))
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # some tokens finished no character: their piece was held back, then released
    assert "" in pieces[:-1]


def test_random_token_sequences(tokenizer):
    """Arbitrary ids, biased to tokens that hold part of a character (so most sequences are
    invalid UTF-8): concatenation == full decode, with and without a prompt, for any chunking;
    a piece never holds U+FFFD unless the full decode has it."""
    rng = random.Random(1234)
    partial = [
        i
        for i in range(tokenizer.vocab_size)
        if i not in tokenizer.special_token_ids and "\ufffd" in tokenizer.token_text(i)
    ]
    assert len(partial) > 100
    prompt = tokenizer.encode("Some prompt text, ending cleanly.")
    for trial in range(600):
        out = [
            rng.choice(partial) if rng.random() < 0.6 else rng.randrange(tokenizer.vocab_size)
            for _ in range(rng.randint(1, 30))
        ]
        skip = trial % 2 == 0
        full = tokenizer.decode(out, skip_special_tokens=skip)
        pieces = _stream(IncrementalDetokenizer(tokenizer, [], skip), out, rng)
        assert "".join(pieces) == full
        with_prompt = "".join(_stream(IncrementalDetokenizer(tokenizer, prompt, skip), out, rng))
        assert tokenizer.decode(prompt, skip) + with_prompt == tokenizer.decode(prompt + out, skip)
        if "\ufffd" not in full:
            assert all("\ufffd" not in p for p in pieces)


def test_random_valid_text(tokenizer):
    """Random strings over emoji / CJK / accents / ASCII, token by token: every piece is clean."""
    rng = random.Random(7)
    alphabet = "abc xyz 019\n\t.,!é漢字テスト한국🎉🚀👍🏽\u200d∑√"
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = _stream(IncrementalDetokenizer(tokenizer, []), ids, rng)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("a<|im_end|>b<|im_start|>c", add_special_tokens=False)
    for skip, expected in ((True, "abc"), (False, "a<|im_end|>b<|im_start|>c")):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        assert "".join(detok.push([i]) for i in ids) + detok.flush() == expected


def test_unfinished_character_released_by_flush(tokenizer):
    first, *_ = tokenizer.encode("🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push([first]) == ""
    assert detok.has_pending
    assert detok.token_text(first) == "\ufffd"  # the logprobs text of the token alone
    assert detok.flush() == tokenizer.decode([first]) == "\ufffd"
    assert detok.flush() == ""


def test_work_per_token_is_bounded(tokenizer):
    """The decode window does not grow with the output (O(1) per token)."""
    ids = tokenizer.encode("The quick brown fox 🦊 jumps over the lazy dog. " * 60, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, list(range(100, 400)))
    longest = 0
    for i in ids:
        detok.push([i])
        longest = max(longest, len(detok._ids))
    assert len(ids) > 500 and longest <= 8
    assert detok.num_output_tokens == len(ids)


def test_sentencepiece_first_token_keeps_its_space(sp_tokenizer):
    """ "▁world" after a prompt streams as " world"; with no prompt it decodes like decode()."""
    prompt = sp_tokenizer.encode("hello")
    out = sp_tokenizer.encode(" the world 日本", add_special_tokens=False)
    text = detokenize(sp_tokenizer, prompt, out)
    assert text == " the world 日本"
    assert sp_tokenizer.decode(prompt) + text == sp_tokenizer.decode(prompt + out)
    assert detokenize(sp_tokenizer, [], out) == sp_tokenizer.decode(out) == "the world 日本"
    # byte-fallback characters (<0xE6><0x97><0xA5>) are held until complete
    rng = random.Random(0)
    pieces = _stream(IncrementalDetokenizer(sp_tokenizer, prompt), out, rng, max_chunk=1)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text
