"""Request body -> GenerateRequest / SamplingParams mapping (requests.py), field by field."""

from __future__ import annotations

import msgspec
import pytest
from api_fake_engine import MODEL, make_config

from zeroserve.api_proc.errors import ApiError, from_decode_error
from zeroserve.api_proc.protocol import ChatCompletionRequest, CompletionRequest, TokenizeBody
from zeroserve.api_proc.requests import chat_plan, completion_plan, tokenize_request
from zeroserve.shared.messages import SamplingParams

CONFIG = make_config()


def completion(**body):
    return completion_plan(msgspec.convert({"prompt": "hi", **body}, CompletionRequest), CONFIG)


def chat(**body):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    return chat_plan(msgspec.convert(body, ChatCompletionRequest), CONFIG)


def test_every_sampling_field_reaches_the_engine():
    plan = completion(
        max_tokens=7,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        seed=11,
        min_tokens=2,
        stop_token_ids=[5, 6],
        ignore_eos=True,
        logprobs=3,
        stop=["\n", "END"],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        priority=-2,
        cache_salt="s",
        user="u",
    )
    (req,) = plan.requests
    assert req.params == SamplingParams(
        max_tokens=7,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        seed=11,
        min_tokens=2,
        stop_token_ids=[5, 6],
        ignore_eos=True,
        logprobs=3,
    )
    assert req.prompt == "hi" and req.messages is None and req.prompt_token_ids is None
    assert req.stop == ["\n", "END"] and req.include_stop_str_in_output is True
    assert req.skip_special_tokens is False and req.priority == -2 and req.cache_salt == "s"
    assert req.queue_timeout_s == CONFIG.request_timeout_s and req.deadline_s is None
    assert req.return_prompt is False
    assert req.request_id == f"{plan.request_id}-0" and plan.logprobs == 3


def test_defaults():
    (req,) = completion().requests
    assert req.params == SamplingParams(max_tokens=0)  # 0: the rest of the context
    assert req.stop == [] and req.skip_special_tokens is True and req.priority == 0
    plan = chat()
    assert plan.requests[0].params.logprobs is None and plan.requests[0].add_generation_prompt is True
    assert not plan.stream and not plan.include_usage and plan.n == 1


def test_top_k_minus_one_is_disabled_and_single_stop_string_is_a_list():
    (req,) = completion(top_k=-1, stop="x").requests
    assert req.params.top_k == 0 and req.stop == ["x"]


def test_chat_specific_fields():
    plan = chat(
        max_tokens=9,
        max_completion_tokens=5,
        logprobs=True,
        top_logprobs=4,
        add_generation_prompt=False,
        stream=True,
        stream_options={"include_usage": True},
    )
    (req,) = plan.requests
    assert req.params.max_tokens == 5  # max_completion_tokens wins
    assert req.params.logprobs == 4 and plan.logprobs == 4
    assert req.add_generation_prompt is False and plan.stream and plan.include_usage and plan.chat
    assert chat(logprobs=True).requests[0].params.logprobs == 0  # sampled token only


def test_messages_mapping():
    plan = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "name": "bob",
            },
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ]
    )
    m = plan.requests[0].messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool"]
    assert m[1].content == "a\nb" and m[1].name == "bob"
    assert m[2].content is None and m[3].tool_call_id == "call_1"


def test_prompt_forms():
    assert [r.prompt for r in completion(prompt=["a", "b"]).requests] == ["a", "b"]
    assert [r.prompt_token_ids for r in completion(prompt=[1, 2, 3]).requests] == [[1, 2, 3]]
    assert [r.prompt_token_ids for r in completion(prompt=[[1], [2, 3]]).requests] == [[1], [2, 3]]


def test_n_times_prompts_ids_and_seeds():
    plan = completion(prompt=["a", "b"], n=3, seed=2**63 - 2)
    ids = [r.request_id for r in plan.requests]
    assert ids == [f"{plan.request_id}-{i}" for i in range(6)]
    assert [r.prompt for r in plan.requests] == ["a"] * 3 + ["b"] * 3
    # seed + j per sample, the same for every prompt; wrapping inside int64
    assert [r.params.seed for r in plan.requests[:3]] == [2**63 - 2, 2**63 - 1, -(2**63)]
    assert [r.params.seed for r in plan.requests[3:]] == [r.params.seed for r in plan.requests[:3]]
    assert [plan.prompt_index(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert all(r.params.seed is None for r in completion(n=2).requests)


def test_echo_asks_for_the_prompt_back():
    plan = completion(echo=True)
    assert plan.echo and plan.requests[0].return_prompt and plan.prompt_texts == ["hi"]


def test_limits_come_from_config():
    config = make_config(max_n=2, max_stop_strings=1, max_logprobs=5)
    body = msgspec.convert({"prompt": "x", "n": 3}, CompletionRequest)
    with pytest.raises(ApiError) as e:
        completion_plan(body, config)
    assert e.value.status == 400 and e.value.param == "n"
    with pytest.raises(ApiError, match="stop"):
        completion_plan(msgspec.convert({"prompt": "x", "stop": ["a", "b"]}, CompletionRequest), config)
    with pytest.raises(ApiError, match="logprobs"):
        completion_plan(msgspec.convert({"prompt": "x", "logprobs": 6}, CompletionRequest), config)


def test_model_must_be_the_served_one():
    assert completion(model=MODEL).model == MODEL
    with pytest.raises(ApiError) as e:
        completion(model="gpt-4")
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_tokenize_request():
    req = tokenize_request(
        msgspec.convert({"prompt": "a", "add_special_tokens": False}, TokenizeBody), CONFIG
    )
    assert req.prompt == "a" and req.add_special_tokens is False
    body = msgspec.convert(
        {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False}, TokenizeBody
    )
    req = tokenize_request(body, CONFIG)
    assert (
        req.messages[0].content == "x"
        and req.add_generation_prompt is False
        and req.add_special_tokens is False
    )


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"prompt": "x", "temperature": "a"}', "temperature"),
        (b'{"prompt": "x", "stream_options": {"include_usage": 1}}', "stream_options.include_usage"),
        (b'{"temperature": 1}', "prompt"),
    ],
)
def test_decode_errors_name_the_param(raw, param):
    with pytest.raises(msgspec.DecodeError) as e:
        msgspec.json.decode(raw, type=CompletionRequest)
    err = from_decode_error(e.value)
    assert err.status == 400 and err.param == param and param in err.message


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "priority", "seed", "min_tokens", "n", "logprobs"])
def test_huge_integers_are_400_not_an_encoding_failure(field):
    with pytest.raises(ApiError) as e:
        completion(**{field: 10**30})
    assert e.value.status == 400 and e.value.param == field
    for prompt, param in (([10**30], "prompt"), ([[10**30]], "prompt")):
        with pytest.raises(ApiError) as e:
            completion(prompt=prompt)
        assert e.value.param == param


def test_deadline_ms_becomes_the_engine_deadline_of_every_choice():
    plan = completion(deadline_ms=2500, n=2)
    assert [r.deadline_s for r in plan.requests] == [2.5, 2.5]
    assert all(r.queue_timeout_s == CONFIG.request_timeout_s for r in plan.requests)
    assert chat(deadline_ms=100).requests[0].deadline_s == 0.1
    for bad in (0, -5, float("inf"), float("nan")):
        with pytest.raises(ApiError) as e:
            completion(deadline_ms=bad)
        assert e.value.status == 400 and e.value.param == "deadline_ms"
