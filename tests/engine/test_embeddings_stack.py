"""POST /v1/embeddings on real processes: the packaged all-MiniLM-L6-v2 served as
`zeroserve serve FOLDER` equals sentence-transformers' own vectors (alone, in one input list of
mixed lengths, and as concurrent requests), in both encoding formats and through the `openai`
client; bad input is a 400 naming the field; and a decoder (the session's SmolLM2 server)
serves embeddings while it generates."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import API_KEY, start_server

MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "A man is eating food.",
    "The new movie is awesome, though the ending was a little too predictable for my taste.",
    "x",
    " ".join(["Each input is embedded on its own, whatever else shares its step."] * 12),
    "Ünïcödé, emoji 🙂 and CJK 漢字 go through the WordPiece tokenizer too.",
]


@pytest.fixture(scope="module")
def reference(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(minilm, device="cpu")
    return {
        "vectors": model.encode(TEXTS),
        "lengths": [len(model.tokenize([t])["input_ids"][0]) for t in TEXTS],
    }


@pytest.fixture(scope="module")
def server(minilm):
    s = start_server(minilm, "--max-model-len", "256")  # its sentence_bert_config's max_seq_length
    yield s
    code = s.stop()
    assert code == 0, s.log()


def vectors_of(body: dict) -> np.ndarray:
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    out = []
    for d in body["data"]:
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.array(e, "<f4"))
    return np.stack(out)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999, cos
    assert np.abs(got - want).max() < 1e-4


def test_one_list_of_mixed_lengths_equals_sentence_transformers(server, reference):
    status, body = server.post("/v1/embeddings", {"model": MODEL, "input": TEXTS})
    assert status == 200, body
    assert body["model"] == MODEL
    assert_same(vectors_of(body), reference["vectors"])
    n = sum(reference["lengths"])
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


def test_concurrent_requests_each_equal_sentence_transformers(server, reference):
    def one(i: int) -> np.ndarray:
        status, body = server.post("/v1/embeddings", {"input": TEXTS[i % len(TEXTS)]})
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == reference["lengths"][i % len(TEXTS)]
        return vectors_of(body)[0]

    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(one, range(10)))
    assert_same(np.stack(got), np.concatenate([reference["vectors"]] * 2))


def test_base64_decodes_to_the_same_floats(server):
    # one input, alone in its step both times: the same float32 values, bit for bit
    _, floats = server.post("/v1/embeddings", {"input": TEXTS[1]})
    _, b64 = server.post("/v1/embeddings", {"input": TEXTS[1], "encoding_format": "base64"})
    assert (
        isinstance(b64["data"][0]["embedding"], str)
        and len(base64.b64decode(b64["data"][0]["embedding"])) == 384 * 4
    )
    assert np.array_equal(vectors_of(b64), vectors_of(floats))


def test_token_ids_are_embedded_as_given(server, reference):
    ids = [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]  # "[CLS] a man is eating food. [SEP]"
    _, one = server.post("/v1/embeddings", {"input": ids})
    _, two = server.post("/v1/embeddings", {"input": [ids, ids[:3]]})
    assert_same(vectors_of(one), reference["vectors"][:1])
    assert np.array_equal(vectors_of(two)[0], vectors_of(one)[0])
    assert two["usage"]["prompt_tokens"] == 11


def test_normalize_false_gives_the_raw_pooled_vector(server, reference):
    _, raw = server.post("/v1/embeddings", {"input": TEXTS[1], "normalize": False})
    v = vectors_of(raw)[0]
    assert abs(np.linalg.norm(v) - 1) > 0.01  # mean pooling without the Normalize module
    assert_same((v / np.linalg.norm(v))[None], reference["vectors"][1:2])


def test_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY)
    res = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 itself
    assert_same(np.array([d.embedding for d in res.data], "<f4"), reference["vectors"])
    assert res.usage.prompt_tokens == sum(reference["lengths"])
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="hello", dimensions=64)
    assert e.value.body["param"] == "dimensions"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", "empty string"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": ["a", ""]}, "input", "input[1] is an empty string"),
        ({"input": ["a", 5]}, "input", "not a mix"),
        ({"input": [[1, 2], []]}, "input", "empty list"),
        ({"input": [1, 99999999]}, "input", "outside the vocabulary"),
        ({"input": "word " * 300}, "input", "maximum context length is 256"),
        ({"input": 5}, "input", "Expected"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "float or base64"),
        ({"input": "a", "dimensions": 0}, "dimensions", "at least 1"),
        ({"input": "a", "dimensions": 100}, "dimensions", "does not support `dimensions`"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, body, param, words):
    status, out = server.post("/v1/embeddings", body)
    assert status == 400, out
    assert out["error"]["param"] == param and words in out["error"]["message"], out


def test_unknown_model_is_a_404(server):
    status, out = server.post("/v1/embeddings", {"model": "nope", "input": "a"})
    assert status == 404 and out["error"]["code"] == "model_not_found"


def test_an_embedding_model_refuses_to_generate(server):
    for path, body in (
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
    ):
        status, out = server.post(path, body)
        assert status == 400 and "only serves embeddings" in out["error"]["message"], out


def test_a_decoder_serves_embeddings_while_it_generates(zeroserve_server):
    s = zeroserve_server

    def chat() -> dict:
        req = urllib.request.Request(
            s.base_url + "/v1/chat/completions",
            data=json.dumps(
                {
                    "messages": [{"role": "user", "content": "Count to twenty."}],
                    "max_tokens": 24,
                    "temperature": 0,
                }
            ).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    texts = ["The capital of France is", "def fibonacci(n):", "x"]
    with ThreadPoolExecutor(2) as pool:
        generating = pool.submit(chat)
        status, batched = s.post("/v1/embeddings", {"input": texts})
        assert generating.result()["choices"][0]["message"]["content"]
    assert status == 200, batched
    got = vectors_of(batched)
    assert got.shape == (3, 576)  # SmolLM2-135M's hidden size: last-token pooling (--pooling auto)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    alone = np.stack([vectors_of(s.post("/v1/embeddings", {"input": t})[1])[0] for t in texts])
    cos = (got * alone).sum(1)
    assert cos.min() > 0.999, cos  # the same vector whatever shares the step (quantized kernels round)
    assert (got @ got.T)[0, 1] < 0.99  # and different inputs differ
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"
