"""Against real zeroserve processes (the session's `zeroserve_server`: the packaged SmolLM2
GGUF): logit_bias moves greedy output, and Hugging Face's own clients (`text_generation`,
`huggingface_hub.InferenceClient`) drive the TGI routes, greedy output equal to /v1's."""

from __future__ import annotations

import json

import pytest

PROMPT = "The capital of France is"
N = 8


@pytest.fixture(scope="module")
def server(zeroserve_server):
    return zeroserve_server


@pytest.fixture(scope="module")
def headers(server):
    return {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}


@pytest.fixture(scope="module")
def v1_greedy(server) -> str:
    status, body = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"]


def first_token(server, prompt: str, **extra) -> tuple[int, str]:
    """The greedy first token's id and text, from TGI's details."""
    params = {"max_new_tokens": 1, "details": True}
    status, body = server.post("/generate", {"inputs": prompt, "parameters": params, **extra})
    assert status == 200, body
    token = body["details"]["tokens"][0]
    return token["id"], token["text"]


def test_logit_bias_moves_the_greedy_output(server):
    greedy_id, greedy_text = first_token(server, PROMPT)
    status, tok = server.post("/tokenize", {"prompt": " banana", "add_special_tokens": False})
    assert status == 200, tok
    (banana,) = tok["tokens"]
    assert banana != greedy_id

    def one(route: str, bias: dict) -> str:
        body = {"max_tokens": 1, "temperature": 0, "logit_bias": {str(k): v for k, v in bias.items()}}
        if route == "/v1/completions":
            body["prompt"] = PROMPT
        else:
            body["messages"] = [{"role": "user", "content": PROMPT}]
        status, out = server.post(route, body)
        assert status == 200, out
        choice = out["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]

    assert one("/v1/completions", {banana: 100}) == " banana"  # +100: the pick whatever the model says
    assert one("/v1/chat/completions", {banana: 100}) == " banana"
    pushed_down = one("/v1/completions", {greedy_id: -100})
    assert pushed_down and pushed_down != greedy_text  # -100 on the greedy token: another one wins
    assert one("/v1/completions", {}) == greedy_text
    # an id outside the vocabulary is the tokenizer's 400, naming the field
    status, err = server.post(
        "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "logit_bias": {"999999": 5}}
    )
    assert status == 400 and err["error"]["param"] == "logit_bias", err


def test_text_generation_client_generate_and_stream(server, headers, v1_greedy):
    text_generation = pytest.importorskip("text_generation")
    client = text_generation.Client(server.base_url, headers=headers, timeout=120)
    res = client.generate(PROMPT, max_new_tokens=N)
    assert res.generated_text == v1_greedy
    d = res.details
    assert d.finish_reason == "length" and d.generated_tokens == N and len(d.tokens) == N
    assert "".join(t.text for t in d.tokens) == v1_greedy
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens)

    streamed = list(client.generate_stream(PROMPT, max_new_tokens=N))
    assert [r.token.id for r in streamed] == [t.id for t in d.tokens]
    assert streamed[-1].generated_text == v1_greedy and streamed[-1].details.generated_tokens == N
    assert all(r.details is None for r in streamed[:-1])

    # a stop sequence ends the text with it (TGI keeps it); the model's own end is eos_token
    stop = v1_greedy[3:7]
    res = client.generate(PROMPT, max_new_tokens=N, stop_sequences=[stop])
    assert res.generated_text == v1_greedy[: v1_greedy.find(stop) + len(stop)]
    assert res.details.finish_reason == "stop_sequence"
    chat = (  # SmolLM2's chat template, rendered: the instruct model then ends its turn itself
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    )
    res = client.generate(chat, max_new_tokens=60)
    assert res.details.finish_reason == "eos_token" and res.details.tokens[-1].special
    assert res.details.generated_tokens < 60

    # seeded sampling reproduces; TGI's own validation errors come back as its exceptions
    a = client.generate(PROMPT, max_new_tokens=N, do_sample=True, seed=7, temperature=1.5)
    b = client.generate(PROMPT, max_new_tokens=N, do_sample=True, seed=7, temperature=1.5)
    assert a.generated_text == b.generated_text and a.details.seed == 7
    with pytest.raises(text_generation.errors.ValidationError, match="typical_p"):
        client.generate(PROMPT, max_new_tokens=N, typical_p=0.5)


def test_huggingface_hub_inference_client(server, v1_greedy):
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(base_url=server.base_url, api_key=server.api_key, timeout=120)
    assert client.text_generation(PROMPT, max_new_tokens=N) == v1_greedy
    out = client.text_generation(PROMPT, max_new_tokens=N, details=True)
    assert out.generated_text == v1_greedy and out.details.generated_tokens == N
    assert out.details.finish_reason == "length"
    assert "".join(client.text_generation(PROMPT, max_new_tokens=N, stream=True)) == v1_greedy
    chunks = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True))
    assert chunks[-1].generated_text == v1_greedy and chunks[-1].details.finish_reason == "length"
    full = client.text_generation(PROMPT, max_new_tokens=N, return_full_text=True)
    assert full == PROMPT + v1_greedy
    status, info = server.get("/info")
    assert status == 200 and b"max_total_tokens" in info


def test_grammar_constrains_tgi_output(server):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    grammar = {"type": "json", "value": schema}
    status, body = server.post(
        "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "grammar": grammar}}
    )
    assert status == 200, body
    out = json.loads(body["generated_text"])
    assert set(out) == {"city", "rank"} and isinstance(out["rank"], int)
    params = {"max_new_tokens": 10, "grammar": {"type": "regex", "value": "(yes|no)"}}
    status, body = server.post("/generate", {"inputs": "Is Paris in France?", "parameters": params})
    assert status == 200 and body["generated_text"] in ("yes", "no"), body
