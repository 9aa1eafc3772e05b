"""response_format and structured_outputs into one StructuredOutput (api_proc/structured.py), and
the tokenizer's admission check of what xgrammar can read (tokenizer_proc/structured.py).
The decoding itself: tests/engine/test_structured_stack.py, tests/gpu_worker/test_grammar.py."""

from __future__ import annotations

import json

import msgspec
import pytest

from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.protocol import ChatCompletionRequest
from zeroserve.api_proc.structured import MAX_SPEC_CHARS, structured_output
from zeroserve.shared.messages import StructuredOutput
from zeroserve.tokenizer_proc.errors import TokenizerError
from zeroserve.tokenizer_proc.structured import StructuredCheck


def body(**fields) -> ChatCompletionRequest:
    raw = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(raw), type=ChatCompletionRequest)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}},
            StructuredOutput("json", json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        (
            {"structured_outputs": {"json": SCHEMA}},
            StructuredOutput("json", json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        (
            {"structured_outputs": {"json": json.dumps(SCHEMA, indent=2)}},  # the JSON text form
            StructuredOutput("json", json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutput("regex", "[0-9]+")),
        ({"structured_outputs": {"choice": ["a", 'b"']}}, StructuredOutput("choice", '["a","b\\""]')),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutput("grammar", 'root ::= "x"')),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object")),
        ({"structured_outputs": {"json_object": False}}, None),
        ({"structured_outputs": {"disable_any_whitespace": True}}, None),
        (
            {"response_format": {"type": "text"}, "structured_outputs": {"regex": "a"}},
            StructuredOutput("regex", "a"),
        ),
    ],
)
def test_fields_to_one_constraint(fields, expected):
    assert structured_output(body(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type", "Unknown response_format type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema", "needs"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "both",
        ),
        (
            {"structured_outputs": {"regex": "a", "grammar": 'root ::= "a"'}},
            "structured_outputs",
            "exactly one",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least one"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex", "empty"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not JSON text"),
        ({"structured_outputs": {"regex": "a" * (MAX_SPEC_CHARS + 1)}}, "structured_outputs", "at most"),
    ],
)
def test_malformed_fields_are_400_naming_the_field(fields, param, says):
    with pytest.raises(ApiError) as e:
        structured_output(body(**fields))
    assert e.value.status == 400 and e.value.param == param and says in e.value.message


@pytest.mark.parametrize(
    ("so", "param", "says"),
    [
        (StructuredOutput("json", '{"type": "strin"}'), "response_format", 'Unsupported type "strin"'),
        (StructuredOutput("json", "{oops"), "response_format", "Failed to parse JSON"),
        (StructuredOutput("json", '{"$ref": "#/$defs/missing"}'), "response_format", "missing"),
        (StructuredOutput("regex", "(a"), "structured_outputs.regex", "parenthesis is not closed"),
        (StructuredOutput("regex", r"(a)\1"), "structured_outputs.regex", "Backreference is not supported"),
        (StructuredOutput("grammar", "root ::= x"), "structured_outputs.grammar", 'Rule "x" is not defined'),
        (StructuredOutput("choice", '["a", 1]'), "structured_outputs.choice", "list of strings"),
        (StructuredOutput("structural_tag", '{"bad": 1}'), "structured_outputs.structural_tag", "format"),
        (StructuredOutput("yaml", ""), "structured_outputs.yaml", "unknown structured output kind"),
    ],
)
def test_tokenizer_refuses_what_xgrammar_cannot_read(so, param, says):
    pytest.importorskip("xgrammar")
    check = StructuredCheck()
    with pytest.raises(TokenizerError) as e:
        check.check(so)
    assert e.value.param == param and says in e.value.message, e.value.message
    assert "/project/cpp" not in e.value.message  # xgrammar's source location is not for clients
    with pytest.raises(TokenizerError):  # the verdict is cached, and still refused
        check.check(so)
    assert check.hits == 1


def test_tokenizer_check_accepts_and_caches_within_bounds():
    pytest.importorskip("xgrammar")
    check = StructuredCheck(max_entries=2)
    for spec in ("a+", "b+", "c+"):
        check.check(StructuredOutput("regex", spec))
    check.check(StructuredOutput("regex", "c+"))
    assert check.hits == 1 and len(check._verdicts) == 2
    check.check(None)
    check.check(StructuredOutput("json_object"))
    check.check(StructuredOutput("json", json.dumps(SCHEMA)))
