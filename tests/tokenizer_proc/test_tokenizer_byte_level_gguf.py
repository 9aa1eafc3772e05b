"""Byte-level GGUF vocabularies with each pre-tokenizer family, against transformers."""

from __future__ import annotations

import os

import pytest
from tokenizer_testdata import TEXTS, write_byte_level_gguf

from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

EXTRA = [
    "<think>reasoning</think> done",
    "<｜bad▁control｜> stays text",
    "<|eot|><|im_end|>",
    "DON'T You'LL 123456789 ,,,!!!\n\n\n   \n",
    "camelCaseWords HTTPServer iPhone",
    "path ~\n/usr and ~\n\n/bin",
]


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe", "gpt-4o"])
def test_pre_tokenizers_match_transformers(gguf_path, tmp_path, pre):
    pytest.importorskip("transformers")
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    path = write_byte_level_gguf(str(tmp_path / f"{pre}.gguf"), gguf_path, pre)
    ours = load_tokenizer(path)
    ref = TokenizersBackend.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    assert ours.vocab_size == len(ref)
    assert ours.eos_token_ids == [2, 3]  # eos, then eot
    assert ours.add_bos == (pre == "llama-bpe")
    for text in TEXTS + EXTRA:
        assert ours.encode(text) == ref.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    think = ours.token_to_id("<think>")
    assert ours.encode("a<think>b", add_special_tokens=False)[1] == think  # matched whole ...
    assert think not in ours.special_token_ids and "<think>" in ours.decode([think])  # ... not special
