"""Our GGUF tokenizer against transformers' GGUF tokenizer on the packaged SmolLM2 file."""

from __future__ import annotations

import random

import pytest
from tokenizer_testdata import TEXTS

from zeroserve.tokenizer_proc.errors import TokenizerLoadError
from zeroserve.tokenizer_proc.gguf_metadata import read_gguf_metadata
from zeroserve.tokenizer_proc.tokenizer import load_tokenizer


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
            assert tokenizer.decode(token_ids, skip) == hf_tokenizer.decode(
                token_ids, skip_special_tokens=skip
            )


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


def _assert_same_metadata(path):
    gguf = pytest.importorskip("gguf")
    ours = read_gguf_metadata(path)
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_metadata_reader_matches_gguf_package(tmp_path):
    """Every GGUF value type, written by the gguf package and read back by both readers."""
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "types.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 255), w.add_int8("t.i8", -128), w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768), w.add_uint32("t.u32", 2**32 - 1), w.add_int32("t.i32", -(2**31))
    w.add_float32("t.f32", 0.5), w.add_bool("t.bool", True), w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63)), w.add_float64("t.f64", 1e-300), w.add_string("t.str", "héllo 🎉")
    w.add_array("t.strs", ["a", "", "Ġb c", "日本"]), w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.25, -1.5]), w.add_array("t.bools", [True, False]), w.add_array("t.empty", [])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    _assert_same_metadata(path)
    meta = read_gguf_metadata(path)
    assert (
        meta["t.strs"] == ["a", "", "Ġb c", "日本"] and meta["t.u64"] == 2**64 - 1 and meta["t.bool"] is True
    )


@pytest.mark.slow
def test_metadata_reader_matches_gguf_package_on_smollm2(gguf_path):
    _assert_same_metadata(gguf_path)


@pytest.mark.slow
def test_auto_tokenizer_is_the_same(gguf_path, hf_tokenizer):
    """The reference fixture skips AutoTokenizer's config read; check it builds the same thing."""
    import os

    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    assert auto.backend_tokenizer.to_str() == hf_tokenizer.backend_tokenizer.to_str()
    assert auto.special_tokens_map == hf_tokenizer.special_tokens_map
    assert auto.chat_template == hf_tokenizer.chat_template


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match="neither"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(TokenizerLoadError, match="not a GGUF file"):
        load_tokenizer(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (5).to_bytes(8, "little")
    )
    with pytest.raises(TokenizerLoadError, match="truncated"):
        load_tokenizer(str(truncated))
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(TokenizerLoadError, match="not a .gguf"):
        load_tokenizer(str(other))
