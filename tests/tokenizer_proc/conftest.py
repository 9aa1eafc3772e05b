"""Shared fixtures: the packaged SmolLM2 GGUF, our tokenizer for it, and transformers' one.

transformers' GGUF tokenizer takes seconds to build, so it is made once per session.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from zeroserve.shared.model_files import ModelNotFoundError, default_model_path  # noqa: E402

# Texts that stress the pre-tokenizer and the byte-level alphabet.
TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nthree newlines\r\nwindows\r\n",
    "digits 0 1 12 123 1234 12345 3.14159 -42 1e10 2024-01-01  1  22",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "emoji 🎉🚀 👨‍👩‍👧‍👦 ❤️ 🇫🇷",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "accents: café, naïve, résumé, Ångström, Zürich, São Paulo, ß",
    "Ελληνικά и русский текст, עברית, العربية",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_start|><|im_end|> glued<|im_end|>text",
    "not special: <|im_start, im_end|>, <im_start>, <|unknown|>",
    "Don't you'll we've they're I'm it's SHOUTING'S",
    "mixed\u00a0nbsp\u2009thin\u200bzero-width\ufeffbom",
    "control \x00\x01\x7f chars",
    "a" * 300 + " " + "xyz" * 50,
]


@pytest.fixture(scope="session")
def gguf_path() -> str:
    try:
        return default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    """transformers' tokenizer for the same GGUF: the reference."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
