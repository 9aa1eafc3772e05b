"""The HF baseline server (benchmarks/baselines/hf_server.py) under `zeroserve bench`.

A tiny random Llama (save_pretrained) and a WordLevel tokenizer (PreTrainedTokenizerFast;
every benchmark word is in its vocabulary, so prompt lengths are exact) are saved into a tmp
dir by the server's subprocess, which then runs the server on a free loopback port with one
torch thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from zeroserve.launcher.bench.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.path.join(REPO, "benchmarks", "baselines", "hf_server.py")


# Runs in the server's subprocess before the server itself, so torch and transformers are
# imported once (tens of seconds of CPU on this shared machine) instead of twice.
_BUILD_AND_SERVE = """
import runpy, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from zeroserve.launcher.bench.datasets import WORDS

path, server = sys.argv[1], sys.argv[2]
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for word in list(dict.fromkeys(WORDS)) + ["You", "are", "assistant", "number"]:
    vocab.setdefault(word, len(vocab))
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(path)
sys.argv = [server, path] + sys.argv[3:]
runpy.run_path(server, run_name="__main__")
"""


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("tiny-llama"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(model_dir, "server.log"), "w+")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BUILD_AND_SERVE,
            model_dir,
            SERVER,
            "--port",
            str(port),
            "--threads",
            "1",
            "--served-model-name",
            "tiny",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"hf_server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("hf_server did not answer /health within 120 s")
            time.sleep(0.3)
        yield base_url, model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_bench_against_the_hf_baseline(hf_server, tmp_path):
    base_url, model_dir = hf_server
    out = tmp_path / "hf.json"
    code = main(
        [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--num-prompts",
            "4",
            "--max-concurrency",
            "2",
            "--input-len",
            "12",
            "--output-len",
            "6",
            "--tokenizer",
            model_dir,
            "--disable-tqdm",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["tokenizer"] != "words"
    assert (res["completed"], res["failed"], res["fields_dropped"]) == (4, 0, [])
    # ignore_eos honoured and usage reported: exactly the asked length, counted by the server.
    assert res["usage_reported"] == 4 and res["output_len_mismatch"] == 0 and res["total_output_tokens"] == 24
    # The server's prompt count equals the one the bench generated with the same tokenizer.
    assert all(r["prompt_tokens"] == 12 for r in res["per_request"])
    # One request at a time: with two clients, each waits about one service time for the lock.
    assert res["mean_concurrency"] <= 2.0 + 1e-6 and res["p99_e2el_ms"] >= res["median_e2el_ms"] > 0


def test_hf_baseline_chat_and_plain_responses(hf_server, tmp_path):
    base_url, model_dir = hf_server
    out = tmp_path / "chat.json"
    code = main(
        [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--endpoint",
            "chat",
            "--dataset",
            "chat",
            "--num-prompts",
            "3",
            "--num-warmups",
            "0",
            "--input-len",
            "4",
            "--system-prompt-len",
            "8",
            "--output-len",
            "3",
            "--tokenizer",
            model_dir,
            "--disable-tqdm",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["completed"] == 3 and res["total_output_tokens"] == 9
    # Later turns carry the history: longer prompts as counted by the server.
    lens = [r["prompt_tokens"] for r in res["per_request"]]
    assert lens[0] < lens[1] < lens[2]
    body = json.dumps({"model": "tiny", "prompt": "the water", "max_tokens": 4, "ignore_eos": True}).encode()
    req = urllib.request.Request(
        base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        reply = json.load(r)
    assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert reply["choices"][0]["finish_reason"] == "length" and isinstance(reply["choices"][0]["text"], str)
    bad = urllib.request.Request(
        base_url + "/v1/completions", data=b'{"prompt": 3}', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=30)
    assert e.value.code == 400 and "prompt" in json.load(e.value)["error"]["message"]
