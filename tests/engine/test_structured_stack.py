"""Structured output through the real processes (the session's `zeroserve_server`: the packaged
SmolLM2 GGUF): a corpus of JSON schemas (tests/data/json_schemas.json) x greedy and sampled
decoding, sent at once so they run batched, each output parsed and validated with
`jsonschema`; regex, choice and json_object; invalid constraints refused with a 400 that says
what is wrong; a grammar dead end ends with a clear reason; and an unconstrained request in a
constrained batch decodes exactly as alone."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

CORPUS = json.load(open(os.path.join(os.path.dirname(__file__), "..", "data", "json_schemas.json")))
MAX_TOKENS = 200  # every schema bounds its strings and arrays: outputs end well before this


@pytest.fixture(scope="module")
def server(request):
    return request.getfixturevalue("zeroserve_server")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key or "none", max_retries=0, timeout=300
    )


def ask_json(client, model: str, case: dict, temperature: float):
    return client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": f"Reply with a JSON value for '{case['name']}' that follows this schema: "
                f"{json.dumps(case['schema'])}",
            }
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True},
        },
        temperature=temperature,
        seed=7,
        max_tokens=MAX_TOKENS,
    )


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_json_schema_corpus_greedy_and_sampled_all_validate(client, model):
    assert len(CORPUS) >= 30
    jobs = [(case, t) for t in (0.0, 1.0) for case in CORPUS]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight together: one batched server
        replies = list(pool.map(lambda job: ask_json(client, model, *job), jobs))
    failures = []
    for (case, t), reply in zip(jobs, replies, strict=True):
        choice = reply.choices[0]
        text = choice.message.content
        try:
            assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}"
            jsonschema.validate(json.loads(text), case["schema"])
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{case['name']} T={t}: {str(e)[:120]}: {text!r}")
    assert not failures, "\n".join(failures)


def completion(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, **kw).choices[0]


def test_regex_choice_and_json_object(client, model):
    phone = completion(
        client,
        model,
        "My phone number is",
        max_tokens=30,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}},
    )
    assert phone.finish_reason == "stop"
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.text), phone.text
    for temperature in (0.0, 1.0):
        pick = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Is the sky green? Answer yes or no."}],
            max_tokens=10,
            temperature=temperature,
            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe not"]}},
        ).choices[0]
        assert pick.finish_reason == "stop" and pick.message.content in ("yes", "no", "maybe not")
    obj = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a cat in JSON with two short fields."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_object"},
    ).choices[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict)


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
            'Unsupported type "strin"',
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
                }
            },  # fmt: skip
            "response_format",
            "minimum greater than maximum",
        ),
        (
            {"structured_outputs": {"regex": "(?=a)b"}},
            "structured_outputs.regex",
            "Lookahead is not supported",
        ),
        (
            {"structured_outputs": {"grammar": 'root ::= "a" | undefined'}},
            "structured_outputs.grammar",
            "not defined",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "both",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "Unknown response_format type"),
    ],
)
def test_invalid_constraint_is_400_saying_why(client, model, extra, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, extra_body=extra
        )
    error = e.value.body
    assert says in error["message"] and error["param"] == param, error


def test_grammar_dead_end_ends_with_its_reason(client, model):
    """After "ok" the grammar allows only EOS, which min_tokens hides: no token can follow."""
    choice = completion(
        client,
        model,
        "Say ok:",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["ok"]}, "min_tokens": 5},
    )
    assert choice.text == "ok"
    assert choice.finish_reason == "stop" and choice.model_extra.get("stop_reason") == "grammar_dead_end"


def test_unconstrained_request_in_a_constrained_batch_decodes_as_alone(client, model):
    prompt = "The three primary colors are"
    plain = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = completion(client, model, prompt, **plain).text
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(ask_json, client, model, case, 0.0) for case in CORPUS[:6]] + [
            pool.submit(completion, client, model, prompt, **plain)
        ]
        results = [f.result() for f in constrained]
    assert results[-1].text == alone
