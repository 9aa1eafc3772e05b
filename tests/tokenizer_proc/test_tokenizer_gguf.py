"""Our GGUF tokenizer against transformers' GGUF tokenizer on the packaged SmolLM2 file."""

from __future__ import annotations

import random

import pytest

from zeroserve.tokenizer_proc.errors import TokenizerLoadError
from zeroserve.tokenizer_proc.gguf_metadata import read_gguf_metadata
from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

from conftest import TEXTS


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text):
    for add_special in (True, False):
        expected = hf_tokenizer.encode(text, add_special_tokens=add_special)
        assert tokenizer.encode(text, add_special_tokens=add_special) == expected


def test_batch_and_round_trip(tokenizer, hf_tokenizer):
    ids = tokenizer.encode_batch(TEXTS)
    assert ids == [hf_tokenizer.encode(t) for t in TEXTS]
    for text, token_ids in zip(TEXTS, ids):
        # Byte-level BPE is lossless; with specials kept, even the chat markers come back.
        assert tokenizer.decode(token_ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert tokenizer.decode(token_ids, skip) == hf_tokenizer.decode(token_ids, skip_special_tokens=skip)


def test_random_ids_decode_like_transformers(tokenizer, hf_tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1  # <|im_start|> in this file
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 2  # <|im_end|>
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.add_bos is False  # tokenizer.ggml.add_bos_token = false
    assert tokenizer.special_token_ids == set(hf_tokenizer.all_special_ids) | set(range(17))
    assert tokenizer.special_tokens["eos_token"] == "<|im_end|>"
    # control tokens are matched whole, never split, and dropped by skip_special_tokens
    assert tokenizer.encode("<|im_start|>x<|im_end|>") == [1, 104, 2]
    assert tokenizer.decode([1, 104, 2]) == "x"
    assert tokenizer.model_max_length == 8192
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_token_text_and_bytes(tokenizer, hf_tokenizer):
    (emoji_first, *_) = tokenizer.encode("🎉")
    assert tokenizer.token_text(emoji_first) == "\ufffd"  # half a character alone
    assert tokenizer.token_bytes(emoji_first) == "🎉".encode()[: len(tokenizer.token_bytes(emoji_first))]
    assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode("🎉 ok")) == "🎉 ok".encode()
    hello = tokenizer.encode(" hello")
    assert [tokenizer.token_text(i) for i in hello] == [hf_tokenizer.decode([i]) for i in hello]
    assert tokenizer.token_text(2) == "<|im_end|>" and tokenizer.token_bytes(2) == b"<|im_end|>"
    assert tokenizer.id_to_token(hello[0]) == hf_tokenizer.convert_ids_to_tokens(hello[0])


def test_metadata_reader_matches_gguf_package(gguf_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(gguf_path)
    ours = read_gguf_metadata(gguf_path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value, key


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match="neither"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(TokenizerLoadError, match="not a GGUF file"):
        load_tokenizer(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(TokenizerLoadError, match="truncated"):
        load_tokenizer(str(truncated))
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(TokenizerLoadError, match="not a .gguf"):
        load_tokenizer(str(other))
