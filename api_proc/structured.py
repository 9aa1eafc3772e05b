"""OpenAI's ``response_format`` and vLLM's ``structured_outputs`` as one StructuredOutput.

Only the shape is checked here (which fields, their types, one constraint per request, a
size cap): whether a schema, regex or grammar is valid and supported is decided by the
tokenizer process (tokenizer_proc/structured.py, with xgrammar, off its event loop), which
answers a 400 that says what is wrong.

    response_format {"type": "text"}                          -> None
    response_format {"type": "json_object"}                   -> ("json_object", "")
    response_format {"type": "json_schema", "json_schema": {"schema": S}}  -> ("json", S as JSON)
    structured_outputs {"json": S} | {"regex": R} | {"choice": [..]} | {"grammar": EBNF}
                       | {"json_object": true} | {"structural_tag": JSON}  -> that kind
"""

from __future__ import annotations

import json

import msgspec

from zeroserve.api_proc.errors import bad_request
from zeroserve.api_proc.protocol import SamplingFields
from zeroserve.shared.messages import StructuredOutput

MAX_SPEC_CHARS = 256 * 1024  # a schema or grammar larger than this is refused before compiling

_encode = msgspec.json.Encoder().encode


def structured_output(body: SamplingFields) -> StructuredOutput | None:
    """The request's output constraint, or None for free text. Raises ApiError (400)."""
    from_format = _from_response_format(body)
    from_extension = _from_structured_outputs(body)
    if from_format is not None and from_extension is not None:
        raise bad_request(
            "Send one output constraint: response_format and structured_outputs were both given.",
            "structured_outputs",
        )
    so = from_format or from_extension
    if so is not None and len(so.spec) > MAX_SPEC_CHARS:
        raise bad_request(
            f"The {so.kind} constraint is {len(so.spec)} characters long; at most {MAX_SPEC_CHARS} are allowed.",
            "response_format" if from_format is not None else "structured_outputs",
        )
    return so


def _from_response_format(body: SamplingFields) -> StructuredOutput | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutput(kind="json_object")
    if rf.type == "json_schema":
        schema = None if rf.json_schema is None else rf.json_schema.schema
        if schema is None:
            raise bad_request(
                'response_format of type "json_schema" needs json_schema.schema (a JSON schema object).',
                "response_format.json_schema.schema",
            )
        return StructuredOutput(kind="json", spec=_encode(schema).decode())
    raise bad_request(
        f'Unknown response_format type `{rf.type[:64]}`; use "text", "json_object" or "json_schema".',
        "response_format.type",
    )


def _from_structured_outputs(body: SamplingFields) -> StructuredOutput | None:
    so = body.structured_outputs
    if so is None:
        return None
    given = []
    if so.json is not None:
        given.append(StructuredOutput(kind="json", spec=_schema_text(so.json)))
    if so.regex is not None:
        if not so.regex:
            raise bad_request("structured_outputs.regex must not be empty.", "structured_outputs.regex")
        given.append(StructuredOutput(kind="regex", spec=so.regex))
    if so.choice is not None:
        if not so.choice:
            raise bad_request(
                "structured_outputs.choice must hold at least one string.", "structured_outputs.choice"
            )
        given.append(StructuredOutput(kind="choice", spec=_encode(so.choice).decode()))
    if so.grammar is not None:
        if not so.grammar.strip():
            raise bad_request("structured_outputs.grammar must not be empty.", "structured_outputs.grammar")
        given.append(StructuredOutput(kind="grammar", spec=so.grammar))
    if so.json_object:
        given.append(StructuredOutput(kind="json_object"))
    if so.structural_tag is not None:
        given.append(StructuredOutput(kind="structural_tag", spec=so.structural_tag))
    if len(given) > 1:
        raise bad_request(
            "structured_outputs takes exactly one of json, regex, choice, grammar, json_object or "
            f"structural_tag; got {', '.join(g.kind for g in given)}.",
            "structured_outputs",
        )
    return given[0] if given else None


def _schema_text(schema) -> str:
    """vLLM takes the schema as an object or as its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise bad_request(
                "structured_outputs.json is a string but not JSON text; send the schema as an object.",
                "structured_outputs.json",
            ) from None
    return _encode(schema).decode()
