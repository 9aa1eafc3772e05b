"""No silent drops: every field of OpenAI's request schema (as the installed `openai` package
declares it) is implemented (and names the test that shows it), accepted because it cannot
change the output, or refused with a 400 that names it. Plus logit_bias' parsing."""

from __future__ import annotations

import os
import re

import msgspec
import pytest
from api_fake_engine import api_client

from zeroserve.api_proc.fields import ACCEPTED, FIELDS, IMPLEMENTED, REFUSED
from zeroserve.api_proc.protocol import ChatCompletionRequest, CompletionRequest

openai = pytest.importorskip("openai")
from openai.types import completion_create_params as completion_params  # noqa: E402
from openai.types.chat import completion_create_params as chat_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
STRUCTS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
BASE = {
    "completions": {"prompt": "hello there", "max_tokens": 3},
    "chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
}
# a value for each field that is not implemented: what a client would really send
SAMPLES = {
    "best_of": 3,
    "suffix": " and the end.",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "def f(): pass"},
    "functions": [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
    "function_call": "auto",
    "web_search_options": {"search_context_size": "low"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
    "user": "user-1234",
    "metadata": {"project": "demo"},
    "store": True,
    "service_tier": "flex",
    "safety_identifier": "hashed-user",
    "prompt_cache_key": "tenant-a",
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
}


def openai_fields(endpoint: str) -> set[str]:
    module = completion_params if endpoint == "completions" else chat_params
    return set(module.CompletionCreateParamsBase.__annotations__) | {"stream"}


FIELD_CASES = [(e, f) for e in ("completions", "chat") for f in sorted(openai_fields(e))]


def test_the_table_lists_exactly_openais_fields():
    for endpoint, table in FIELDS.items():
        assert set(table) == openai_fields(endpoint), endpoint


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        return False
    with open(full) as f:
        return not name or re.search(rf"^(async )?def {re.escape(name)}\(", f.read(), re.M) is not None


@pytest.mark.parametrize(("endpoint", "name"), FIELD_CASES)
async def test_each_openai_field_is_implemented_accepted_or_refused_by_name(endpoint, name):
    field = FIELDS[endpoint][name]
    if field.status == IMPLEMENTED:
        assert name in {f.name for f in msgspec.structs.fields(STRUCTS[endpoint])}, name
        assert _test_exists(field.note), f"{endpoint}.{name}: the test {field.note} does not exist"
        return
    assert name in SAMPLES, f"add a realistic value for {name} to SAMPLES"
    async with api_client() as client:
        r = await client.post(ROUTES[endpoint], json={**BASE[endpoint], name: SAMPLES[name]})
        body = await r.json()
        if field.status == ACCEPTED:
            assert r.status == 200, body
            assert len(client.fake.requests) == 1
        else:
            assert field.status == REFUSED
            assert r.status == 400, body
            assert body["error"]["param"] == name
            assert name in body["error"]["message"]
            assert client.fake.requests == []  # refused before the engine hears of it


@pytest.mark.parametrize(
    ("route", "extra"),
    [
        (ROUTES["chat"], {"modalities": ["text"]}),
        (ROUTES["chat"], {"verbosity": "medium"}),
        (ROUTES["chat"], {"audio": None, "prediction": None}),
        (ROUTES["completions"], {"suffix": ""}),
        (ROUTES["completions"], {"best_of": 2, "n": 2}),
        (ROUTES["completions"], {"best_of": 1}),
    ],
)
async def test_values_that_ask_for_nothing_pass(route, extra):
    base = BASE["chat"] if route == ROUTES["chat"] else BASE["completions"]
    async with api_client() as client:
        r = await client.post(route, json={**base, **extra})
        assert r.status == 200, await r.text()


async def test_best_of_below_n_is_an_error_of_its_own():
    async with api_client() as client:
        r = await client.post(ROUTES["completions"], json={**BASE["completions"], "best_of": 1, "n": 2})
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "best_of"
        assert "at least n" in body["error"]["message"]


async def test_logit_bias_reaches_the_engine_as_token_ids():
    async with api_client() as client:
        for route, base in ((ROUTES["completions"], BASE["completions"]), (ROUTES["chat"], BASE["chat"])):
            r = await client.post(route, json={**base, "logit_bias": {"42": 100, " 7": -5.5, "0": 0}})
            assert r.status == 200, await r.text()
        assert [q.params.logit_bias for q in client.fake.requests] == [{42: 100.0, 7: -5.5, 0: 0.0}] * 2
        r = await client.post(ROUTES["completions"], json={**BASE["completions"], "logit_bias": {}})
        assert r.status == 200 and client.fake.requests[-1].params.logit_bias is None


@pytest.mark.parametrize(
    "bias",
    [
        {"abc": 1},
        {"-1": 1},
        {"1.5": 1},
        {"²": 1},
        {"5": 100.5},
        {"5": -101},
        {"5": "high"},
        {str(i): 1 for i in range(301)},
        ["5"],
    ],
)
async def test_bad_logit_bias_is_400_naming_it(bias):
    async with api_client() as client:
        r = await client.post(ROUTES["completions"], json={**BASE["completions"], "logit_bias": bias})
        body = await r.json()
        assert r.status == 400, body
        assert body["error"]["param"].startswith("logit_bias")  # a wrong type: msgspec names the key too
        assert client.fake.requests == []


@pytest.mark.parametrize("route", sorted(ROUTES.values()))
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("guided_json", {"type": "object"}),
        ("guided_regex", "[a-z]+"),
        ("guided_choice", ["yes", "no"]),
        ("guided_grammar", 'root ::= "a"'),
        ("guided_decoding_backend", "xgrammar"),
    ],
)
async def test_vllms_old_guided_fields_are_refused_by_name_not_dropped(route, name, value):
    """Clients written for older vLLM still send guided_*; unconstrained text with a 200 would
    be a silent drop."""
    endpoint = next(e for e, r in ROUTES.items() if r == route)
    async with api_client() as client:
        r = await client.post(route, json={**BASE[endpoint], name: value})
        body = await r.json()
        assert r.status == 400, body
        assert body["error"]["param"] == name
        assert client.fake.requests == []
