"""Fuzz (issue 13): hypothesis draws request bodies for /v1/completions, /v1/chat/completions,
/tokenize and /detokenize (valid JSON of the wrong shapes, huge numbers, NaN and Infinity as
strings and as bare tokens, unicode with lone surrogates, bodies that are not JSON or nested
thousands deep) and sends them to the session's real server. Never a 500, never a hang, every
4xx an OpenAI error body; afterwards the same greedy request gives the same answer, the KV pool
is free and no process died or restarted.

Bodies stay cheap to run when valid: every max-tokens-like value drawn is either invalid or at
most a few tokens (the session server's context is 2,048 tokens, and a body left at "the rest
of the context" would run for minutes on a CPU). Rerun a failure with ZEROSERVE_FUZZ_SEED.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tests.stack_health import assert_unharmed, error_body_problem, full_log, wait_engine_idle


@pytest.fixture(scope="module")
def server(request):
    try:
        return request.getfixturevalue("zeroserve_server")
    except pytest.FixtureLookupError:
        pytest.skip("the zeroserve_server fixture (tests/conftest.py) is not defined")


def post(server, path: str, data: bytes, content_type: str = "application/json", timeout: float = 60):
    """(status, content type, body) of one POST, sent byte for byte as given."""
    host, port = server.base_url.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": content_type}
        if server.api_key:
            headers["Authorization"] = f"Bearer {server.api_key}"
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- strategies

EDGE_INTS = [
    0,
    -1,
    1,
    2,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**40,
    -(10**40),
]
# bigger than the context, past int64, negative: never a valid request that runs long
BAD_LENGTHS = [0, -1, 2049, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**40]
ODD_STRINGS = [
    "",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "1e309",
    "0x10",
    "\ud800",  # a lone surrogate: JSON escapes it as \ud800
    "a\udfffb",
    "\udbff\udfff",  # a valid pair
    "\x00",
    "\u202e\u200b\ufeff",
    "💥" * 50,
    "<|im_end|>",
    "<|im_start|>system",
    "{{ raise_exception('x') }}",
    "{% for x in range(10**9) %}{% endfor %}",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5, 2.0000001]),
    st.text(max_size=20),
    st.sampled_from(ODD_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# a value that stands for a bare token in the body text (not a JSON string)
RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "01",
    "1.",
    "+1",
    ".5",
    "0x10",
    "True",
    "undefined",
]
raw_marker = st.sampled_from(RAW_TOKENS).map(lambda t: f"__RAW__{t}__")

# null would mean "the rest of the context"
lengths = st.one_of(
    st.sampled_from(BAD_LENGTHS + [1, 2, 3]),
    json_values.filter(lambda v: v is not None and not isinstance(v, int)),
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard", ""])
            | json_values,
            "content": st.text(max_size=40)
            | st.sampled_from(ODD_STRINGS)
            | json_values
            | st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "type": st.sampled_from(["text", "image_url"]) | json_values,
                        "text": json_values,
                    },
                ),
                max_size=3,
            ),
            "name": json_values,
            "tool_call_id": json_values,
        },
    ),
    max_size=4,
)
prompts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(ODD_STRINGS),
    st.lists(st.sampled_from(EDGE_INTS) | st.integers(0, 60000), max_size=8),
    st.lists(st.text(max_size=10), max_size=6),
    st.lists(st.lists(st.sampled_from(EDGE_INTS) | st.integers(0, 60000), max_size=4), max_size=4),
    json_values,
)

SAMPLING_FIELDS = [
    "model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "presence_penalty",
    "frequency_penalty", "user", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos",
    "min_tokens", "priority", "skip_special_tokens", "include_stop_str_in_output", "cache_salt",
]  # fmt: skip
FIELD_VALUES = {
    "max_tokens": lengths,
    "max_completion_tokens": lengths,
    "min_tokens": lengths,
    "messages": messages | json_values,
    "prompt": prompts,
    "tokens": st.lists(st.sampled_from(EDGE_INTS) | st.integers(0, 60000), max_size=8) | json_values,
    "stop": st.lists(st.text(max_size=300) | st.sampled_from(ODD_STRINGS), max_size=10) | json_values,
    "stop_token_ids": st.lists(st.sampled_from(EDGE_INTS), max_size=70) | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
    "n": st.integers(-2, 18) | json_values,
    "model": st.sampled_from(["SmolLM2-135M-Instruct", "x" * 5000]) | json_values,
}
# values of the right JSON type, mostly, so that bodies get past decoding to the range checks,
# the tokenizer and the scheduler's admission
edge_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e-45, 0.01, 0.5, 1.0, 1.0000001, 2.0, 100.0, 1e308, -1e308]
)
right_type = {
    "float": edge_floats,
    "int": st.sampled_from(EDGE_INTS) | st.integers() | st.integers(-3, 25),
    "bool": st.booleans(),
    "str": st.text(max_size=30) | st.sampled_from(ODD_STRINGS),
}
FIELD_TYPES = {
    "temperature": "float", "top_p": "float", "min_p": "float", "presence_penalty": "float",
    "frequency_penalty": "float", "repetition_penalty": "float",
    "seed": "int", "top_k": "int", "priority": "int", "top_logprobs": "int",
    "stream": "bool", "ignore_eos": "bool", "skip_special_tokens": "bool", "include_stop_str_in_output": "bool",
    "echo": "bool", "add_special_tokens": "bool", "add_generation_prompt": "bool",
    "user": "str", "cache_salt": "str",
}  # fmt: skip
for name, kind in FIELD_TYPES.items():
    FIELD_VALUES[name] = st.one_of(right_type[kind], right_type[kind], right_type[kind], json_values)
# completions: a count; chat: a flag
FIELD_VALUES["logprobs"] = st.one_of(right_type["int"], right_type["bool"], json_values)
GREEDY_BASE = {"max_tokens": 2, "temperature": 0}
ENDPOINTS = {
    "/v1/completions": (
        {"prompt": "Hello", **GREEDY_BASE},
        ["prompt", "max_tokens", "logprobs", "echo", *SAMPLING_FIELDS],
    ),
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "Hello"}], **GREEDY_BASE},
        [
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "logprobs",
            "top_logprobs",
            "add_generation_prompt",
            *SAMPLING_FIELDS,
        ],
    ),
    "/tokenize": (
        {"prompt": "Hello"},
        ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"],
    ),
    "/detokenize": ({"tokens": [1, 2, 3]}, ["tokens", "model"]),
}
# bodies that are not a JSON object at all, or that choke parsers (all but one a 4xx)
ODD_BODIES = [
    b"",
    b" ",
    b"null",
    b"[]",
    b"{}",
    b"42",
    b'"prompt"',
    b"{",
    b"}",
    b"{'prompt': 'x'}",
    b"\xff\xfe\x00",
    b"\xef\xbb\xbf{}",
    b'{"prompt": "x",}',
    b'{"prompt": "x"} trailing',
    b'{"prompt": "\xff\xfe"}',
    b'{"prompt": "x", "max_tokens": 2, "prompt": [1, 2]}',  # the last key wins: a valid request
    b'{"prompt": "\\ud800", "max_tokens": 1}',
    b"[" * 5000,
    b"[" * 5000 + b"]" * 5000,
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"messages": [{"role": "user", "content": ' + b"[" * 4000 + b"]" * 4000 + b"}]}",
]


@st.composite
def fuzz_requests(draw) -> tuple[str, bytes, str]:
    """(path, body bytes, content type)."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    if draw(st.integers(0, 9)) == 0:
        return path, draw(st.sampled_from(ODD_BODIES) | st.binary(max_size=64)), "application/json"
    base, fields = ENDPOINTS[path]
    body = dict(base)
    for name in draw(
        st.lists(st.sampled_from(fields + ["unknown_field"]), min_size=1, max_size=4, unique=True)
    ):
        choice = draw(st.integers(0, 9))
        if choice == 0 and name not in ("max_tokens", "max_completion_tokens"):
            body.pop(name, None)  # a required field left out
        elif choice == 1:
            body[name] = draw(raw_marker)
        else:
            body[name] = draw(FIELD_VALUES.get(name, json_values))
    text = json.dumps(body)  # ensure_ascii: lone surrogates go out as \ud800 escapes
    for token in RAW_TOKENS:
        text = text.replace(f'"__RAW__{token}__"', token)
    content_type = draw(
        st.sampled_from(["application/json"] * 8 + ["text/plain", "application/x-www-form-urlencoded"])
    )
    return path, text.encode(), content_type


# --------------------------------------------------------------------------- checks


def check_ok_body(path: str, raw: bytes, content_type: str) -> str | None:
    """None when a 200 answer is well-formed for ``path``, else what is wrong."""
    if content_type.startswith("text/event-stream"):
        events = [line[len(b"data: ") :] for line in raw.split(b"\n") if line.startswith(b"data: ")]
        if not events or events[-1] != b"[DONE]":
            return f"stream does not end with [DONE]: {raw[-200:]!r}"
        for e in events[:-1]:
            try:
                chunk = json.loads(e)
            except ValueError:
                return f"stream chunk is not JSON: {e[:200]!r}"
            if "error" in chunk:
                return f"error event in a 200 stream: {chunk}"
            if not isinstance(chunk.get("choices"), list):
                return f"chunk without choices: {chunk}"
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return f"200 body is not JSON: {raw[:200]!r}"
    want = {"/tokenize": "tokens", "/detokenize": "prompt"}.get(path, "choices")
    if not isinstance(body, dict) or want not in body:
        return f"200 body without {want}: {raw[:200]!r}"
    return None


def send_and_check(server, path: str, data: bytes, content_type: str) -> int:
    started = time.monotonic()
    try:
        status, answer_type, raw = post(server, path, data, content_type)
    except TimeoutError:
        raise AssertionError(f"no answer in 60s to {path} {data[:300]!r}") from None
    where = f"{path} {content_type} body {data[:300]!r} -> {status} in {time.monotonic() - started:.1f}s"
    assert status < 500, f"{where}: {raw[:300]!r}"
    if status >= 400:
        problem = error_body_problem(raw)
        assert problem is None, f"{where}: {problem}"
    else:
        assert status == 200, f"{where}: {raw[:300]!r}"
        problem = check_ok_body(path, raw, answer_type)
        assert problem is None, f"{where}: {problem}"
    return status


GREEDY = json.dumps(
    {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
)


def greedy_text(server) -> str:
    status, _, raw = post(server, "/v1/completions", GREEDY.encode())
    assert status == 200, raw[:300]
    return json.loads(raw)["choices"][0]["text"]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("body", ODD_BODIES, ids=lambda b: f"{b[:12]!r}..{len(b)}")
@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_odd_bodies_never_500(server, path, body):
    send_and_check(server, path, body, "application/json")


def test_body_over_the_size_limit_is_413(server):
    big = json.dumps({"prompt": "x" * (5 * 1024 * 1024)}).encode()
    status, _, raw = post(server, "/v1/completions", big)
    assert status == 413 and error_body_problem(raw) is None, raw[:300]


@pytest.mark.parametrize(
    "max_examples", [pytest.param(300, id="300"), pytest.param(5000, id="5000", marks=pytest.mark.slow)]
)
def test_fuzzed_bodies_never_500_and_hurt_nobody(server, max_examples):
    fuzz_seed = int(os.environ.get("ZEROSERVE_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed {fuzz_seed}; rerun with ZEROSERVE_FUZZ_SEED={fuzz_seed}")
    expected = greedy_text(server)
    pids = server.children()
    log_offset = len(full_log(server))

    @hypothesis_seed(fuzz_seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=fuzz_requests())
    def fuzz(request):
        statuses[request[0], send_and_check(server, *request)] += 1

    statuses: Counter = Counter()
    fuzz()
    print(f"fuzz seed {fuzz_seed}: {sorted(statuses.items())}")
    # the bodies stray from valid ones by a field or few: some must still be served
    assert sum(n for (_, status), n in statuses.items() if status == 200) > 0, statuses
    assert greedy_text(server) == expected, f"fuzz seed {fuzz_seed}: the engine answers differently now"
    wait_engine_idle(server)
    assert_unharmed(server, pids, log_offset)
