"""Tool calls against a real server (the packaged SmolLM2) with the `openai` client: `required`
and a named function give arguments that validate against the function's schema, whole and
streamed; `none` gives text; a tool result is rendered back into the next turn's prompt."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, start_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two small integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def server():
    s = start_server()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _model(client) -> str:
    return client.models.list().data[0].id


def _check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed(client, **kwargs) -> tuple[str, list[tuple[str, str]], str | None]:
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(model=_model(client), stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:  # a call's first delta names it
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls.append([d.function.name, d.function.arguments or ""])
            else:
                assert d.function.name is None
                calls[d.index][1] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(c) for c in calls], finish


def test_required_calls_validate_whole_and_streamed(client):
    kwargs = dict(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=100, temperature=0)
    r = client.chat.completions.create(model=_model(client), **kwargs)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not message.content
    assert all(c.id.startswith("call_") and c.type == "function" for c in message.tool_calls)
    whole = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    _check_calls(whole)
    content, calls, finish = _streamed(client, **kwargs)
    assert content == "" and finish == "tool_calls"
    _check_calls(calls)
    assert [(n, json.loads(a)) for n, a in calls] == [
        (n, json.loads(a)) for n, a in whole
    ]  # greedy: the same


def test_required_sampled_calls_validate(client):
    """Sampled at temperature 1, the grammar still makes every answer a valid call. One call
    (parallel_tool_calls false): with parallel calls allowed the small model, sampled, may list
    calls until max_tokens cuts the array, which is not what this checks."""
    r = client.chat.completions.create(
        model=_model(client),
        messages=[{"role": "user", "content": "Add 3 and 4, then tell me the weather in Rome."}],
        tools=[WEATHER, ADD],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=1.0,
        seed=7,
        n=2,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert len(choice.message.tool_calls) == 1
        _check_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls])


def test_named_function_streamed(client):
    content, calls, finish = _streamed(
        client,
        messages=ASK,
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=40,
        temperature=0,
    )
    assert content == "" and finish == "tool_calls" and [n for n, _ in calls] == ["add"]
    _check_calls(calls)


def test_tool_choice_none_gives_text(client):
    r = client.chat.completions.create(
        model=_model(client), messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_bad_tools_are_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=_model(client),
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )
    assert e.value.body["param"] == "tool_choice"


def test_tool_result_is_rendered_into_the_next_turn(client, server):
    arguments = '{"city": "Paris", "unit": "c"}'
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "RESULT: 21 degrees and sunny"},
    ]
    r = client.chat.completions.create(
        model=_model(client), messages=turn, tools=[WEATHER], max_tokens=16, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the prompt the model saw holds the call and its result
    status, tokens = server.post("/tokenize", {"messages": turn})
    assert status == 200, tokens
    status, text = server.post("/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200
    prompt = text["prompt"]
    assert "<tool_response>\nRESULT: 21 degrees and sunny\n</tool_response>" in prompt
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>' in prompt
