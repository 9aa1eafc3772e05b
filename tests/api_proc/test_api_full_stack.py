"""The HTTP API against real zeroserve processes (the session's `zeroserve_server`: the
packaged SmolLM2 GGUF, max_model_len 2048, an API key), driven by the `openai` client and
by raw HTTP for what the client would refuse to send."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(request):
    try:
        return request.getfixturevalue("zeroserve_server")
    except pytest.FixtureLookupError:
        pytest.skip("the zeroserve_server fixture (tests/conftest.py) is not defined")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key or "none", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def http(
    server,
    method: str,
    path: str,
    body: bytes | None = None,
    key: str | None = "server",
    timeout: float = 120,
) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(
        server.base_url + path, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    key = server.api_key if key == "server" else key
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metric(server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    _, _, text = http(server, "GET", "/metrics", key=None)
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not in /metrics")


def wait_until_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, "zeroserve:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine still runs requests: an abort did not arrive"
        time.sleep(0.25)


GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


def test_models_and_probes(server, model):
    status, _, body = http(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["max_model_len"] == 2048
    for path in ("/health", "/ready", "/metrics"):
        assert http(server, "GET", path, key=None)[0] == 200, path


def test_completion_stream_equals_whole_greedy(client, model):
    whole = client.completions.create(model=model, prompt="The capital of France is", **GREEDY)
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(
        client.completions.create(
            model=model,
            prompt="The capital of France is",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_whole_and_stream(client, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_and_prompt_batch(client, model):
    out = client.completions.create(
        model=model, prompt=["Once upon a time", "1, 2, 3,"], n=2, max_tokens=4, seed=3, temperature=0.8
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("length", "stop") for c in out.choices)
    assert 0 < out.usage.completion_tokens <= 16


def test_stop_string_and_echo(client, model):
    out = client.completions.create(
        model=model, prompt="1, 2, 3, 4,", temperature=0, max_tokens=30, stop=[" 7"]
    )
    assert out.choices[0].finish_reason == "stop" and "7" not in out.choices[0].text
    echo = client.completions.create(
        model=model, prompt="Hello there", echo=True, max_tokens=3, temperature=0
    )
    assert echo.choices[0].text.startswith("Hello there")


def test_logprobs(client, model):
    out = client.completions.create(
        model=model,
        prompt="The sky is",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(len(t) >= 2 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the sampled token is the most likely one
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-3 for c in content)


def test_tokenize_token_prompt_detokenize(server, client, model):
    status, _, body = http(server, "POST", "/tokenize", json.dumps({"prompt": "Hello world"}).encode())
    assert status == 200
    tokens = json.loads(body)["tokens"]
    assert json.loads(body)["count"] == len(tokens) > 0
    status, _, body = http(server, "POST", "/detokenize", json.dumps({"tokens": tokens}).encode())
    assert status == 200 and "Hello world" in json.loads(body)["prompt"]
    by_text = client.completions.create(model=model, prompt="Hello world", **GREEDY)
    by_ids = client.completions.create(model=model, prompt=tokens, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_bad_requests(server, client, model):
    cases = [
        ({"model": model, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": model, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": model, "prompt": "x", "n": 99}, 400, "n"),
        ({"model": model, "prompt": [10**7]}, 400, "prompt"),  # outside the vocabulary
        ({"model": model, "prompt": "hello " * 3000}, 400, "prompt"),  # longer than the context
        ({"model": model, "prompt": "hello", "max_tokens": 2048}, 400, "max_tokens"),  # prompt + max_tokens
        ({"model": "nope", "prompt": "x"}, 404, "model"),
    ]
    for body, status, param in cases:
        got, _, raw = http(server, "POST", "/v1/completions", json.dumps(body).encode())
        err = json.loads(raw)["error"]
        assert (got, err["param"]) == (status, param), (body if len(str(body)) < 200 else param, raw[:300])
    got, _, raw = http(server, "POST", "/v1/chat/completions", b"{oops")
    assert got == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    got, _, raw = http(
        server,
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
    )
    assert got == 400 and json.loads(raw)["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="hello " * 3000, max_tokens=1)


def test_auth(server):
    if not server.api_key:
        pytest.skip("the server runs without an API key")
    assert http(server, "GET", "/v1/models", key=None)[0] == 401
    status, headers, raw = http(server, "POST", "/v1/completions", b"{}", key="wrong")
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_stream_disconnect_aborts(server, client, model):
    wait_until_idle(server)
    stream = client.completions.create(
        model=model,
        prompt="Write a long story.",
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_until_idle(server)


def test_non_stream_disconnect_aborts(server, model):
    wait_until_idle(server)
    host, port = server.base_url.rsplit("//", 1)[1].split(":")
    body = json.dumps(
        {"model": model, "prompt": "Write a long story.", "max_tokens": 1500, "ignore_eos": True}
    ).encode()
    auth = f"Authorization: Bearer {server.api_key}\r\n".encode() if server.api_key else b""
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + auth
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        deadline = time.monotonic() + 20
        while metric(server, "zeroserve:num_requests_running") == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.2)
    wait_until_idle(server)  # 1500 tokens would take minutes; the abort frees it at once


def test_metrics_count_requests(server):
    before = metric(server, "zeroserve:generation_tokens_total")
    http(
        server,
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}).encode(),
    )
    assert metric(server, "zeroserve:generation_tokens_total") == before + 3
