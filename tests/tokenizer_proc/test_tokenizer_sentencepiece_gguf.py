"""GGUF files with a SentencePiece ("llama") vocabulary, against transformers."""

from __future__ import annotations

import os

import pytest
from tokenizer_testdata import write_sentencepiece_gguf

from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

SP_TEXTS = [
    "hello the world",
    "hello",
    " hello  world   is in",
    "héllo wörld 日本 🎉",
    "<s>hello</s> the<tool>world",
    "\n\tthe\n",
    "",
]


def _reference(path):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.parametrize("merges", [False, True], ids=["merges_from_scores", "merges_in_file"])
def test_sentencepiece_gguf_matches_transformers(tmp_path, merges):
    pytest.importorskip("transformers")
    path = write_sentencepiece_gguf(str(tmp_path / "sp.gguf"), merges=merges)
    ours, ref = load_tokenizer(path), _reference(path)
    assert ours.add_bos and ours.bos_token_id == 1 and ours.eos_token_ids == [2]
    assert ours.vocab_size == len(ref)
    for text in SP_TEXTS:
        for add_special in (True, False):
            assert ours.encode(text, add_special) == ref.encode(text, add_special_tokens=add_special), text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
    # unknown characters fall back to bytes and decode back whole
    assert ours.decode(ours.encode("日本 🎉")) == "日本 🎉"
    assert ours.token_bytes(ours.token_to_id("<0xE6>")) == b"\xe6"
    assert 0 in ours.special_token_ids and 1 in ours.special_token_ids  # <unk>, <s>
    assert ours.token_to_id("<tool>") not in ours.special_token_ids  # user-defined: whole but not special


def test_add_bos_flag_false(tmp_path):
    ours = load_tokenizer(write_sentencepiece_gguf(str(tmp_path / "sp.gguf"), add_bos=False))
    assert not ours.add_bos
    assert ours.encode("hello")[0] != 1
