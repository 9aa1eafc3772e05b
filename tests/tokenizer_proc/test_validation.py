"""Prompt encoding and checks: every bad request is a TokenizerError naming its field."""

from __future__ import annotations

import pytest

from zeroserve.shared.messages import ChatMessage
from zeroserve.tokenizer_proc.errors import (
    ChatTemplateError,
    InvalidTokenIdError,
    PromptTooLongError,
    TokenizerError,
)
from zeroserve.tokenizer_proc.validation import check_prompt_length, check_token_ids, encode_prompt


def test_check_token_ids():
    check_token_ids([0, 5, 9], vocab_size=10)
    for bad, position in (([1, 10], 1), ([-1], 0), ([3, 2.0], 1), ([True], 0)):
        with pytest.raises(InvalidTokenIdError, match=rf"prompt_token_ids\[{position}\].*\[0, 10\)") as info:
            check_token_ids(bad, vocab_size=10)
        assert info.value.param == "prompt_token_ids"


def test_encode_prompt_each_source(tokenizer):
    assert encode_prompt(tokenizer, prompt="Hello world") == tokenizer.encode("Hello world")
    chat = [ChatMessage(role="user", content="Hi")]
    ids = encode_prompt(tokenizer, messages=chat)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
    assert ids[:1] == [1] and ids[-3:] == tokenizer.encode("<|im_start|>assistant\n")[-3:]
    no_prompt = encode_prompt(tokenizer, messages=chat, add_generation_prompt=False)
    assert not tokenizer.decode(no_prompt, skip_special_tokens=False).endswith("assistant\n")
    assert encode_prompt(tokenizer, prompt_token_ids=[5, 6]) == [5, 6]
    # a model vocabulary larger than the tokenizer's (padded embedding) is allowed
    assert encode_prompt(tokenizer, prompt_token_ids=[49200], vocab_size=49280) == [49200]
    with pytest.raises(InvalidTokenIdError):
        encode_prompt(tokenizer, prompt_token_ids=[tokenizer.vocab_size])


def test_encode_prompt_bad_requests(tokenizer):
    with pytest.raises(TokenizerError, match="exactly one"):
        encode_prompt(tokenizer)
    with pytest.raises(TokenizerError, match="got prompt, messages"):
        encode_prompt(tokenizer, prompt="a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="messages is empty") as info:
        encode_prompt(tokenizer, messages=[])
    assert info.value.param == "messages"


def test_check_prompt_length():
    check_prompt_length(10, max_model_len=100, max_tokens=90)
    with pytest.raises(TokenizerError, match="empty"):
        check_prompt_length(0, max_model_len=100)
    with pytest.raises(
        PromptTooLongError, match="maximum context length is 100 tokens.*prompt has 100"
    ) as info:
        check_prompt_length(100, max_model_len=100)
    assert info.value.param == "prompt"
    with pytest.raises(PromptTooLongError, match="lower max_tokens to at most 60") as info:
        check_prompt_length(40, max_model_len=100, max_tokens=61)
    assert info.value.param == "max_tokens"
