"""Prompt encoding and the checks that need the tokenizer: every bad request is a
TokenizerError naming its field. (The prompt's length against the context is the scheduler's:
tests/scheduler/test_sched_admission.py.)"""

from __future__ import annotations

import re

import pytest

from zeroserve.shared.messages import ChatMessage, GenerateRequest, SamplingParams
from zeroserve.tokenizer_proc.errors import ChatTemplateError, InvalidTokenIdError, TokenizerError
from zeroserve.tokenizer_proc.validation import build_prompt, check_token_ids, encode_prompt


def test_check_token_ids():
    check_token_ids([0, 5, 9], vocab_size=10)
    for bad, token in (([1, 10], 10), ([-1], -1), ([3, 2.0], 2.0), ([True], True)):
        expected = (
            rf"Token id {re.escape(str(token))} in prompt_token_ids is outside the vocabulary \[0, 10\)\."
        )
        with pytest.raises(InvalidTokenIdError, match=expected) as info:
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


def generate(**fields) -> GenerateRequest:
    return GenerateRequest(request_id="r", **{"params": SamplingParams(), **fields})


def test_build_prompt_resolves_the_rest_of_the_context_and_leaves_the_length_to_the_scheduler(tokenizer):
    vocab = tokenizer.vocab_size
    ids, params = build_prompt(
        tokenizer, generate(prompt="Hello world", params=SamplingParams(max_tokens=0)), 100, vocab
    )
    assert ids == tokenizer.encode("Hello world") and params.max_tokens == 100 - len(ids)
    # an explicit max_tokens, even past the context, is the scheduler's to refuse
    ids, params = build_prompt(
        tokenizer, generate(prompt_token_ids=[5] * 150, params=SamplingParams(max_tokens=7)), 100, vocab
    )
    assert len(ids) == 150 and params.max_tokens == 7
    # a prompt that fills the context leaves no room: the scheduler refuses it, naming the prompt
    _, params = build_prompt(
        tokenizer, generate(prompt_token_ids=[5] * 150, params=SamplingParams(max_tokens=0)), 100, vocab
    )
    assert params.max_tokens == -50


def test_build_prompt_checks_prompt_and_stop_ids_against_the_model_vocabulary(tokenizer):
    vocab = tokenizer.vocab_size
    with pytest.raises(InvalidTokenIdError) as info:
        build_prompt(tokenizer, generate(prompt_token_ids=[10, 999_999]), 100, vocab)
    assert (info.value.param, info.value.message) == (
        "prompt",
        f"Token id 999999 in prompt is outside the vocabulary [0, {vocab}).",  # the API's wording, kept
    )
    stops = SamplingParams(stop_token_ids=[2, vocab])
    with pytest.raises(InvalidTokenIdError, match=f"Token id {vocab} in stop_token_ids") as info:
        build_prompt(tokenizer, generate(prompt="x", params=stops), 100, vocab)
    assert info.value.param == "stop_token_ids"
    # a model vocabulary larger than the tokenizer's (padded embedding) bounds both
    ids, params = build_prompt(tokenizer, generate(prompt_token_ids=[vocab], params=stops), 100, vocab + 128)
    assert ids == [vocab] and params.stop_token_ids == [2, vocab]
