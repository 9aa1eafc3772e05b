"""Tool calls without an engine: request checks (400 naming the field), the constraint for
`required` / a named function, and the parsers, whole and streamed (split at every character)."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest
from api_fake_engine import FakeEngineClient, api_client, sse_events

from zeroserve.api_proc.config import ApiConfig
from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.protocol import ChatCompletionRequest
from zeroserve.api_proc.requests import chat_plan
from zeroserve.api_proc.tools import ToolPlan, parse_output, tool_plan
from zeroserve.shared.messages import TextDelta

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters at all


def body(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return msgspec.convert(fields, ChatCompletionRequest)


def plan(mode="auto", parser="hermes", parallel=True, named=None, tools=(WEATHER, TIME)) -> ToolPlan:
    return ToolPlan(tools=list(tools), mode=mode, parser=parser, named=named, parallel=parallel)


def streamed(p: ToolPlan, text: str, step: int = 1) -> tuple[str, list[dict]]:
    """Content and calls as a client assembles them from the deltas; checks the delta shapes."""
    stream = p.stream()
    content, calls = "", []
    pieces = [stream.feed(text[i : i + step]) for i in range(0, len(text), step)] + [stream.finish()]
    for piece, deltas in pieces:
        content += piece
        for d in deltas:
            if "id" in d:  # a call's first delta: index, id, type, name and arguments ""
                assert d["index"] == len(calls) and d["type"] == "function" and d["id"].startswith("call_")
                assert d["function"]["arguments"] == ""
                calls.append({"name": d["function"]["name"], "arguments": ""})
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls


def whole(p: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    content, calls = parse_output(p, text)
    for c in calls:
        assert c["id"].startswith("call_") and len(c["id"]) > 10 and c["type"] == "function"
    return content, [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]


def args(calls: list[dict]) -> list[tuple[str, object]]:
    return [(c["name"], json.loads(c["arguments"])) for c in calls]


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "fn", "function": {"name": "get_weather"}}},
            "tool_choice.type",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "x", "function": {"name": "f"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].type",
        ),
    ],
)
def test_bad_tool_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(ApiError) as e:
        chat_plan(body(**fields), ApiConfig(engine_address="ipc:///x", model_name="m"))
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_tool_choice_none_without_tools_is_accepted():
    assert tool_plan(body(tool_choice="none"), "hermes") is None


def test_plan_carries_tools_and_the_constraint():
    config = ApiConfig(engine_address="ipc:///x", model_name="m")
    p = chat_plan(body(tools=[WEATHER, TIME], tool_choice="required"), config)
    request = p.requests[0]
    assert json.loads(request.tools)[0]["function"]["name"] == "get_weather"
    assert request.params.structured.kind == "json"
    assert p.tools.mode == "required"
    auto = chat_plan(body(tools=[WEATHER]), config)
    assert auto.tools.mode == "auto" and auto.requests[0].params.structured is None


def test_required_schema_accepts_calls_and_refuses_others():
    schema = json.loads(plan("required").structured().spec)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}], schema)
    jsonschema.validate(
        [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}], schema
    )
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = json.loads(plan("required", parallel=False).structured().spec)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, one)


def test_named_schema_is_the_functions_parameters():
    assert (
        json.loads(plan("named", named="get_weather").structured().spec) == WEATHER["function"]["parameters"]
    )
    assert plan("auto").structured() is None and plan("none").structured() is None


# --------------------------------------------------------------------------- parsers

HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}]<tool\\"", '
    '"unit": "c"}}\n</tool_call>\n<tool_call>{"name":"get_time","arguments":{}}</tool_call>'
)


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_hermes_parallel_calls_whole_and_streamed(step):
    expected = [("get_weather", {"city": 'Paris "}]<tool"', "unit": "c"}), ("get_time", {})]
    content, calls = whole(plan(), HERMES)
    assert content == "Let me check." and args(calls) == expected
    content, calls = streamed(plan(), HERMES, step)
    assert content.strip() == "Let me check." and "<tool" not in content and args(calls) == expected


def test_hermes_arguments_stream_in_pieces():
    stream = plan().stream()
    pieces = [d for ch in HERMES for d in stream.feed(ch)[1]]
    assert sum(1 for d in pieces if "id" not in d and d["index"] == 0) > 5  # not one lump at the close


def test_hermes_without_parallel_keeps_the_first_call():
    for content, calls in (whole(plan(parallel=False), HERMES), streamed(plan(parallel=False), HERMES)):
        assert [c["name"] for c in calls] == ["get_weather"]
        assert "get_time" not in (content or "")


@pytest.mark.parametrize(
    "text",
    [
        'hi <tool_call>{"name": oops}</tool_call> bye',
        "<tool_call>not json at all</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        "a < b and <tool_ca",
    ],
)
def test_hermes_malformed_calls_stay_content(text):
    assert whole(plan(), text) == (text, [])
    assert streamed(plan(), text) == (text, [])


def test_text_without_calls_is_untouched():
    text = "  Hello <b>world</b>\n"
    for p in (plan(), plan(parser="llama3_json"), plan("none")):
        assert whole(p, text) == (text, []) and streamed(p, text, 3) == (text, [])
    assert whole(plan("none"), HERMES) == (HERMES, [])  # tool_choice none: never parsed


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_llama3_json_calls(step):
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "X"}}; {"name": "get_time", "parameters": {}}'
    expected = [("get_weather", {"city": "X"}), ("get_time", {})]
    content, calls = whole(plan(parser="llama3_json"), text)
    assert content is None and args(calls) == expected
    content, calls = streamed(plan(parser="llama3_json"), text, step)
    assert content == "" and args(calls) == expected


@pytest.mark.parametrize(
    "text", ['{"a": 1} then text', 'Sure: {"name": "get_time", "parameters": {}}', "{broken"]
)
def test_llama3_json_not_calls_stay_content(text):
    assert whole(plan(parser="llama3_json"), text) == (text, [])
    assert streamed(plan(parser="llama3_json"), text) == (text, [])


@pytest.mark.parametrize(
    "rest",
    ["Done: that is the time.", '{"name": "get_weather", "parameters": "now"}', '{"a": 1} and text'],
)
@pytest.mark.parametrize("step", [1, 5, 1000])
def test_llama3_json_what_follows_the_calls_is_content_whole_and_streamed(rest, step):
    text = '{"name": "get_time", "parameters": {}}; ' + rest
    p = plan(parser="llama3_json")
    for content, calls in (whole(p, text), streamed(p, text, step)):
        assert content == rest and args(calls) == [("get_time", {})]


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (
            "hermes",
            '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"X\\"}"}\n</tool_call>',
        ),
        ("hermes", '<tool_call>{"name": "get_time", "arguments": 5}</tool_call>'),
        ("llama3_json", '{"name": "get_time", "parameters": "now"}'),
    ],
)
@pytest.mark.parametrize("step", [1, 1000])
def test_arguments_that_are_not_an_object_stay_content_whole_and_streamed(parser, text, step):
    assert whole(plan(parser=parser), text) == (text, [])
    assert streamed(plan(parser=parser), text, step) == (text, [])


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_required_array(step):
    text = '[{"name": "get_weather", "arguments": {"city": "[Oslo]"}}, {"name": "get_time", "arguments": {}}]'
    expected = [("get_weather", {"city": "[Oslo]"}), ("get_time", {})]
    assert args(whole(plan("required"), text)[1]) == expected
    content, calls = streamed(plan("required"), text, step)
    assert content == "" and args(calls) == expected


def test_required_cut_short_is_content_when_whole():
    text = '[{"name": "get_weather", "arguments": {"ci'
    assert whole(plan("required"), text) == (text, [])


def test_named_function_output_is_its_arguments():
    text = '{"city": "Oslo", "unit": "f"}'
    p = plan("named", named="get_weather")
    assert args(whole(p, text)[1]) == [("get_weather", {"city": "Oslo", "unit": "f"})]
    content, calls = streamed(p, text, 5)
    assert content == "" and args(calls) == [("get_weather", {"city": "Oslo", "unit": "f"})]


# --------------------------------------------------------------------------- through HTTP

PIECES = [
    "Sure",
    ". <tool",
    '_call>{"name": "get_',
    'weather", "arguments": {"city":',
    ' "Oslo"}}</tool_call>',
]


class ScriptedEngine(FakeEngineClient):
    """Answers every request with PIECES, one delta each, then stop."""

    def stream(self, req):
        self.requests.append(req)

        async def deltas():
            for k, piece in enumerate(PIECES):
                last = k == len(PIECES) - 1
                yield TextDelta(
                    request_id=req.request_id,
                    text=piece,
                    token_ids=[k],
                    num_prompt_tokens=3 if k == 0 else 0,
                    finish_reason="stop" if last else None,
                )

        return deltas()


CHAT = {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER]}


async def test_auto_calls_in_a_whole_response():
    async with api_client(ScriptedEngine()) as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200, await resp.text()
        choice = (await resp.json())["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


async def test_auto_calls_streamed_in_openais_shape():
    async with api_client(ScriptedEngine()) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status == 200, await resp.text()
        chunks = [e["choices"][0] for e in (await sse_events(resp))[:-1]]
    deltas = [c["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."  # no tag text leaks
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    first = calls[0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Oslo"}'
    assert len(calls) > 2  # the arguments came in pieces, as the model wrote them
    assert chunks[-1]["finish_reason"] == "tool_calls"


async def test_tool_choice_none_leaves_the_text_alone():
    async with api_client(ScriptedEngine()) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "tool_choice": "none"})
        choice = (await resp.json())["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "".join(PIECES)}
    assert choice["finish_reason"] == "stop"
