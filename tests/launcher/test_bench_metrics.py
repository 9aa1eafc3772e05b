"""Benchmark maths and parsing on synthetic inputs with hand-computed expectations."""

from __future__ import annotations

import json
import math
import random

import pytest

from zeroserve.launcher.bench.client import RequestResult, SSEParser, build_payload
from zeroserve.launcher.bench.datasets import (
    BenchRequest,
    WordsCounter,
    chat_dataset,
    jsonl_dataset,
    random_dataset,
    text_of_length,
)
from zeroserve.launcher.bench.metrics import compute_metrics, meets_slos, parse_goodput, percentile, tpot
from zeroserve.launcher.bench.runner import arrival_gaps, prefix_counts_of


def ok(ttft, itl, out_tokens, prompt_tokens=10, expected_out=None):
    """A successful request: E2EL = TTFT + sum(ITL) (the last chunk ends the stream)."""
    return RequestResult(
        success=True,
        ttft=ttft,
        itl=list(itl),
        latency=ttft + sum(itl),
        output_tokens=out_tokens,
        prompt_tokens=prompt_tokens,
        usage_reported=True,
        expected_output_len=expected_out or out_tokens,
    )


def test_percentile_interpolates_between_ranks():
    xs = [15, 20, 35, 40, 50]  # rank = p/100 * 4
    assert percentile(xs, 0) == 15 and percentile(xs, 100) == 50
    assert percentile(xs, 50) == 35
    assert percentile(xs, 90) == pytest.approx(46.0)  # rank 3.6: 40 + 0.6*10
    assert percentile(xs, 99) == pytest.approx(49.6)  # rank 3.96
    assert percentile([3, 1, 2], 25) == pytest.approx(1.5)  # unsorted input, rank 0.5
    assert percentile([7], 99) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_tpot_excludes_the_first_token():
    r = ok(ttft=0.100, itl=[0.02, 0.03, 0.04], out_tokens=4)  # E2EL 0.19
    assert tpot(r) == pytest.approx((0.19 - 0.10) / 3)
    assert tpot(ok(0.1, [], 1)) is None


def test_metrics_on_synthetic_timings():
    # Request A: TTFT 100 ms, chunks every 20/30/40 ms, 4 tokens -> E2EL 190, TPOT 30 ms.
    # Request B: TTFT 300 ms, one gap of 50 ms, 3 tokens (two chunks: the server batched two
    #   tokens in one chunk) -> E2EL 350, TPOT 25 ms; ITL counts chunks, so one gap only.
    # Request C: failed with a 500.
    a, b = ok(0.1, [0.02, 0.03, 0.04], 4, prompt_tokens=12), ok(0.3, [0.05], 3, prompt_tokens=8)
    c = RequestResult(error="http_500", expected_prompt_len=5)
    m = compute_metrics([a, b, c], duration_s=2.0, percentiles=(50, 90, 99))
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, {"http_500": 1})
    assert m["total_input_tokens"] == 20 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(13.5)
    assert m["mean_concurrency"] == pytest.approx((0.19 + 0.35) / 2.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p90_ttft_ms"] == pytest.approx(280.0)  # 100 + 0.9*200
    assert m["std_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_tpot_ms"] == pytest.approx(27.5)
    assert m["mean_e2el_ms"] == pytest.approx(270.0) and m["max_e2el_ms"] == pytest.approx(350.0)
    # ITL pooled over requests: [20, 30, 40, 50] ms.
    assert m["mean_itl_ms"] == pytest.approx(35.0)
    assert m["median_itl_ms"] == pytest.approx(35.0)
    assert m["p99_itl_ms"] == pytest.approx(49.7)  # rank 2.97: 40 + 0.97*10
    assert m["goodput"] is None and m["goodput_fraction"] is None


def test_goodput_counts_requests_within_every_slo():
    fast = ok(0.05, [0.01] * 9, 10)  # TTFT 50, TPOT 10, E2EL 140 ms
    slow_first = ok(0.50, [0.01] * 9, 10)  # TTFT 500
    slow_decode = ok(0.05, [0.10] * 9, 10)  # TPOT 100
    single = ok(0.05, [], 1)  # no TPOT: meets a TPOT SLO
    failed = RequestResult(error="timeout")
    slos = parse_goodput("ttft:100, tpot:20")
    assert slos == {"ttft": 100.0, "tpot": 20.0}
    assert [meets_slos(r, slos) for r in (fast, slow_first, slow_decode, single, failed)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    m = compute_metrics([fast, slow_first, slow_decode, single, failed], duration_s=4.0, slos=slos)
    assert m["goodput"] == pytest.approx(0.5) and m["goodput_fraction"] == pytest.approx(0.4)
    assert meets_slos(fast, parse_goodput("e2el:100")) is False  # E2EL 140 > 100


def test_goodput_itl_bounds_every_gap_not_the_mean():
    # TPOT 30 ms in both; one request has a single 230 ms stall among 5 ms gaps
    steady = ok(0.05, [0.03] * 9, 10)
    stalled = ok(0.05, [0.005] * 8 + [0.23], 10)
    slos = parse_goodput("itl:100")
    assert tpot(steady) == pytest.approx(tpot(stalled))
    assert [meets_slos(r, slos) for r in (steady, stalled)] == [True, False]
    assert meets_slos(stalled, parse_goodput("tpot:100")) is True  # the mean hides the stall
    assert meets_slos(ok(0.05, [], 1), slos) is True  # one output token: no gap to bound


@pytest.mark.parametrize("bad", ["ttft", "latency:100", "ttft:abc", "tpot:-1"])
def test_goodput_spec_errors_say_what_to_write(bad):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(bad)


def test_no_success_gives_null_latencies():
    m = compute_metrics([RequestResult(error="connection")], duration_s=1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None
    json.dumps(m, allow_nan=False)


def test_sse_parser_handles_split_events_crlf_and_comments():
    p = SSEParser()
    stream = b': keep-alive\r\n\r\ndata: {"a": 1}\r\n\r\ndata: {"b":\ndata: 2}\n\nevent: x\ndata: [DONE]\n\n'
    events = []
    for i in range(0, len(stream), 5):  # arbitrary network splits
        events += p.feed(stream[i : i + 5])
    assert events == ['{"a": 1}', '{"b":\n2}', "[DONE]"]
    p2 = SSEParser()
    assert p2.feed(b'data: {"c": 3}') == [] and p2.close() == ['{"c": 3}']


def test_gamma_arrivals_have_the_asked_mean_rate():
    gaps = arrival_gaps(4000, rate=20.0, burstiness=0.5, rng=random.Random(1))
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.08)
    # burstiness 0.5 -> coefficient of variation sqrt(2); Poisson (1) -> 1.
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(math.sqrt(2), rel=0.1)
    assert arrival_gaps(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]


def test_random_dataset_lengths_and_distinct_prefixes():
    reqs = random_dataset(20, input_len=50, output_len=7, counter=WordsCounter(), seed=3, range_ratio=0.2)
    assert all(40 <= r.prompt_len <= 60 and r.prompt_len == len(r.prompt.split()) for r in reqs)
    assert all(6 <= r.output_len <= 8 for r in reqs)
    assert len({r.prompt.split()[0] for r in reqs}) == 20
    assert [r.prompt for r in random_dataset(3, 10, 5, WordsCounter(), seed=3)] == [
        r.prompt for r in random_dataset(3, 10, 5, WordsCounter(), seed=3)
    ]


def _digit_splitting_counter():
    """A WordLevel tokenizer over the benchmark's words that splits numbers into digits, as
    SmolLM2's and Llama 3's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from zeroserve.launcher.bench.datasets import WORDS, _Wrapped

    vocab = {"[UNK]": 0}
    for word in WORDS + list("0123456789"):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return tok, _Wrapped(tok, "test")


def test_text_of_length_is_exact_with_a_real_tokenizer():
    tok, counter = _digit_splitting_counter()
    for n in (1, 17, 64):
        text, counted = text_of_length(n, counter, random.Random(n))
        assert counted == n == len(tok.encode(text).ids)
    # The distinct number leading each random prompt is several tokens: still counted in.
    for r in random_dataset(5, input_len=20, output_len=3, counter=counter, seed=1):
        assert r.prompt_len == 20 == len(tok.encode(r.prompt).ids)
        assert r.prompt.split()[0].isdigit()


def test_chat_dataset_shares_system_prompts_and_grows_history():
    reqs = chat_dataset(
        7,
        input_len=5,
        output_len=4,
        counter=WordsCounter(),
        num_system_prompts=2,
        system_prompt_len=20,
        turns=3,
    )
    assert len(reqs) == 7 and [r.conversation for r in reqs] == [0, 0, 0, 1, 1, 1, 2]
    systems = [r.prompt[0]["content"] for r in reqs]
    assert systems[0] == systems[6] != systems[3]  # conversations 0 and 2 share system prompt 0
    # Turn t extends turn t-1: the earlier messages are a prefix, one assistant + one user added.
    assert reqs[1].prompt[:2] == reqs[0].prompt and reqs[2].prompt[:4] == reqs[1].prompt
    assert [m["role"] for m in reqs[2].prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert reqs[2].prompt_len > reqs[1].prompt_len > reqs[0].prompt_len


def test_jsonl_dataset_reads_prompts_messages_and_batch_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "one two three", "max_tokens": 9}\n\n'
        '{"messages": [{"role": "user", "content": "hi there"}]}\n'
        '{"custom_id": "x", "body": {"prompt": "four five"}}\n'
    )
    reqs = jsonl_dataset(str(path), 4, output_len=5, counter=WordsCounter())
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(3, 9), (2, 5), (2, 5), (3, 9)]
    assert isinstance(reqs[1].prompt, list)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        jsonl_dataset(str(bad), 1, 5, WordsCounter())


def test_payload_carries_optional_fields_only_when_kept():
    req = BenchRequest([{"role": "user", "content": "hi"}], 1, 12)
    full = build_payload("completions", "m", req, ("ignore_eos", "min_tokens", "stream_options"), 0.0)
    assert full["prompt"].startswith("User: hi") and full["max_tokens"] == 12
    assert (
        full["ignore_eos"] is True
        and full["min_tokens"] == 12
        and full["stream_options"] == {"include_usage": True}
    )
    bare = build_payload("chat", "m", req, ("stream_options",), 0.0)
    assert "ignore_eos" not in bare and "min_tokens" not in bare and bare["messages"] == req.prompt


def test_prefix_cache_counts_read_either_metrics_prefix_and_sum_replicas():
    zs = (
        "# HELP zeroserve:prefix_cache_hits_total x\n"
        'zeroserve:prefix_cache_hits_total{model_name="m",replica="r0"} 30.0\n'
        'zeroserve:prefix_cache_hits_total{model_name="m",replica="r1"} 10.0\n'
        'zeroserve:prefix_cache_queries_total{model_name="m",replica="r0"} 100.0\n'
        'zeroserve:prefix_cache_hits_created{model_name="m"} 1.7e9\n'
    )
    assert prefix_counts_of(zs) == (40.0, 100.0)
    vllm = zs.replace("zeroserve:", "vllm:")  # --metrics-prefix vllm, or vLLM's own server
    assert prefix_counts_of(vllm) == (40.0, 100.0)
    assert prefix_counts_of("other:prefix_cache_hits_total{} 5.0\n") is None
    assert prefix_counts_of("") is None
