"""Test data shared by the tokenizer_proc tests (a uniquely named module: every test package
has its own conftest.py, so `from conftest import ...` could pick up another one)."""

from __future__ import annotations

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


# A tiny SentencePiece-style ("llama") vocabulary: specials, 256 byte-fallback tokens, pieces.
SP_PIECES = [
    "▁",
    "e",
    "t",
    "h",
    "a",
    "l",
    "o",
    "w",
    "r",
    "d",
    "i",
    "s",
    "n",
    "▁t",
    "th",
    "he",
    "▁the",
    "ll",
    "lo",
    "▁h",
    "el",
    "hel",
    "hell",
    "hello",
    "▁hello",
    "▁a",
    "at",
    "▁at",
    "▁w",
    "or",
    "▁wor",
    "wor",
    "▁world",
    "orld",
    "rld",
    "ld",
    "is",
    "▁is",
    "in",
    "▁in",
    "▁▁",
    "▁▁▁",
    "é",
]


def write_sentencepiece_gguf(
    path: str, merges: bool = False, add_bos: bool | None = None, chat_template: str | None = None
) -> str:
    """A tokenizer-only GGUF with tokenizer.ggml.model = "llama" (scores, byte fallback)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SP_PIECES, "<tool>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))] + [0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES) + [4]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if merges:  # the merges that the scores imply, spelled "a b"
        from zeroserve.tokenizer_proc.gguf_tokenizer import merges_from_scores

        vocab = {t: i for i, t in enumerate(tokens)}
        w.add_token_merges([f"{a} {b}" for a, b in merges_from_scores(vocab, dict(zip(tokens, scores)))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_byte_level_gguf(path: str, source_gguf: str, pre: str, num_merges: int = 3000) -> str:
    """A small byte-level ("gpt2") GGUF cut from a real one: its first num_merges merges (+ a few
    digit merges, which SmolLM2 lacks), the 256
    byte characters and the tokens those merges make, plus specials of every kind:
    control (type 3), a mislabeled control token outside the byte alphabet (skipped, as
    transformers does), a user-defined token (type 4), and an eot id."""
    import gguf

    from zeroserve.tokenizer_proc.gguf_metadata import read_gguf_metadata
    from zeroserve.tokenizer_proc.tokenizer import bytes_to_unicode

    merges = read_gguf_metadata(source_gguf)["tokenizer.ggml.merges"][:num_merges]
    # merges the regex families disagree on: digit groups (\p{N}{1,3} vs \p{N}) and "\n/"
    # (gpt-4o keeps "/" after punctuation and newlines in one piece, llama3 does not)
    merges += ["1 2", "12 3", "4 5", "45 6", "Ċ /"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>", "<｜bad▁control｜>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["<think>"]
    tokens += list(dict.fromkeys(m.replace(" ", "") for m in merges if m.replace(" ", "") not in tokens))
    types = [3] * len(specials) + [1] * 256 + [4] + [1] * (len(tokens) - len(specials) - 257)
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_context_length(128)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_eot_token_id(3)
    w.add_add_bos_token(pre == "llama-bpe")  # one variant adds BOS
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
