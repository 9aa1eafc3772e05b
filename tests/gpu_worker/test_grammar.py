"""The worker's matcher bookkeeping (gpu_worker/grammar.py) on a byte vocabulary: masks only on
constrained rows, matchers advanced by the sampled tokens, rebuilt by replay after a
preemption, dropped when finished, dead ends reported; and the compiled-grammar cache."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from zeroserve.gpu_worker.grammar import GrammarBook, GrammarCache  # noqa: E402
from zeroserve.shared.messages import NewRequestData, SamplingParams, StepPlan, StructuredOutput  # noqa: E402

EOS = 256
VOCAB = 260  # 256 bytes, EOS, and 3 ids past the tokenizer's vocabulary (a padded lm_head)


def byte_info():
    return xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], vocab_size=VOCAB, stop_token_ids=[EOS])


def rows(*ids):
    return [SimpleNamespace(request_id=i) for i in ids]


def new(rid, so, token_ids=(1, 2), num_prompt_tokens=-1):
    params = SamplingParams(structured=so)
    return NewRequestData(rid, list(token_ids), [0], 0, len(token_ids), params, num_prompt_tokens)


def allowed(logits_row) -> set[int]:
    return {i for i, v in enumerate(logits_row.tolist()) if v != float("-inf")}


def step(book, ids, tokens):
    """One step over sampling rows ``ids``: mask zero logits, then accept ``tokens``."""
    logits = torch.zeros(len(ids), VOCAB)
    constrained = book.prepare(rows(*ids))
    if constrained is None:
        return logits, []
    constrained.mask(logits)
    return logits, constrained.finish(tokens)


REGEX = StructuredOutput("regex", "ab[0-9]")


def test_only_constrained_rows_are_masked_and_matchers_advance():
    book = GrammarBook(byte_info, VOCAB)
    book.sync(StepPlan(0, new=[new("c", REGEX), new("free", None)]))
    assert set(book.rows) == {"c"}
    logits, dead = step(book, ["free", "c"], [ord("z"), ord("a")])
    assert dead == []
    assert allowed(logits[0]) == set(range(VOCAB))  # the unconstrained row is untouched
    assert allowed(logits[1]) == {ord("a")}
    logits, _ = step(book, ["c", "free"], [ord("b"), ord("q")])
    assert allowed(logits[0]) == {ord("b")} and allowed(logits[1]) == set(range(VOCAB))
    logits, _ = step(book, ["c"], [ord("7")])
    assert allowed(logits[0]) == {ord(c) for c in "0123456789"}
    logits, _ = step(book, ["c"], [EOS])
    assert allowed(logits[0]) == {EOS}  # complete: only the stop token, never the padded ids


def test_no_constrained_row_no_work():
    book = GrammarBook(byte_info, VOCAB)
    assert book.prepare(rows("a", "b")) is None
    book.sync(StepPlan(0, new=[new("c", REGEX)]))
    assert book.prepare(rows("a", "b")) is None  # a constrained request not sampling this step


def test_preempted_request_replays_its_tokens():
    book = GrammarBook(byte_info, VOCAB)
    book.sync(StepPlan(0, new=[new("c", REGEX)]))
    step(book, ["c"], [ord("a")])
    step(book, ["c"], [ord("b")])
    # preempted, then sent again with prompt (1, 2) + the two tokens it generated
    book.sync(StepPlan(1, finished_ids=["c"]))
    assert "c" not in book.rows
    book.sync(StepPlan(2, new=[new("c", REGEX, (1, 2, ord("a"), ord("b")), num_prompt_tokens=2)]))
    logits, dead = step(book, ["c"], [ord("5")])
    assert dead == [] and allowed(logits[0]) == {ord(c) for c in "0123456789"}


def test_finished_requests_free_their_slots():
    book = GrammarBook(byte_info, VOCAB)
    book.sync(StepPlan(0, new=[new(f"r{i}", REGEX) for i in range(40)]))  # past the first 16 slots
    assert len({row.slot for row in book.rows.values()}) == 40
    logits, dead = step(book, [f"r{i}" for i in range(40)], [ord("a")] * 40)
    assert dead == [] and all(allowed(row) == {ord("a")} for row in logits)
    book.sync(StepPlan(1, finished_ids=[f"r{i}" for i in range(40)] + ["never-known"]))
    assert book.rows == {} and len(book._free) == book._buffer.shape[0]
    book.sync(StepPlan(2, new=[new("again", StructuredOutput("choice", json.dumps(["yes", "no"])))]))
    logits, _ = step(book, ["again"], [ord("n")])
    assert allowed(logits[0]) == {ord("y"), ord("n")}
    book.clear()
    assert book.rows == {}


def test_refused_token_and_finished_grammar_are_dead_ends():
    book = GrammarBook(byte_info, VOCAB)
    book.sync(StepPlan(0, new=[new("a", REGEX), new("b", StructuredOutput("choice", '["x"]'))]))
    # row a samples a token its mask forbids (e.g. min_tokens hid every allowed one)
    _, dead = step(book, ["a", "b"], [ord("z"), ord("x")])
    assert dead == ["a"]
    _, dead = step(book, ["b"], [EOS])  # b is complete: EOS accepted, the matcher terminates
    assert dead == []
    logits, dead = step(book, ["b"], [EOS])  # ignore_eos kept it going: nothing may follow
    assert dead == ["b"] and allowed(logits[0]) == set(range(VOCAB))


def test_grammar_that_fails_to_compile_is_a_dead_end_not_a_crash():
    book = GrammarBook(byte_info, VOCAB)
    book.sync(StepPlan(0, new=[new("bad", StructuredOutput("regex", "(unclosed")), new("ok", REGEX)]))
    logits, dead = step(book, ["bad", "ok"], [0, ord("a")])
    assert dead == ["bad"] and allowed(logits[1]) == {ord("a")}


class HeldPool:
    """An executor whose jobs run only when released: a full compile that takes its time."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut: Future = Future()
        self.jobs.append((fut, fn, args))
        return fut

    def release(self):
        for fut, fn, args in self.jobs:
            fut.set_result(fn(*args))


def test_rows_decode_on_the_quick_grammar_until_the_full_one_is_compiled():
    book = GrammarBook(byte_info, VOCAB)
    held = book._full_pool = HeldPool()
    book.sync(StepPlan(0, new=[new("c", REGEX)]))
    logits, dead = step(book, ["c"], [ord("a")])  # no step waits for the full compile
    assert dead == [] and allowed(logits[0]) == {ord("a")} and not book.rows["c"].final
    logits, _ = step(book, ["c"], [ord("b")])
    assert allowed(logits[0]) == {ord("b")} and book.rows["c"].tokens == [ord("a"), ord("b")]
    held.release()
    # the next mask was queued before the release: the step after it runs on the full grammar
    logits, dead = step(book, ["c"], [ord("3")])
    assert dead == [] and allowed(logits[0]) == {ord(c) for c in "0123456789"}
    logits, dead = step(book, ["c"], [EOS])
    row = book.rows["c"]
    assert dead == [] and allowed(logits[0]) == {EOS}
    assert row.final and row.tokens == []  # rebuilt and replayed to "ab3"


def test_cache_shares_compiles_and_evicts_by_count_and_bytes():
    compiled = []

    def compile_fn(so):
        from concurrent.futures import Future

        fut: Future = Future()
        fut.set_result(SimpleNamespace(memory_size_bytes=100))
        compiled.append(so.spec)
        return fut

    cache = GrammarCache(compile_fn, max_entries=3, max_bytes=250)
    a, b, c = (StructuredOutput("regex", s) for s in "abc")
    assert cache.get(a) is cache.get(a)
    cache.get(b)
    assert cache.num_bytes == 200
    cache.get(a)  # a is now the most recent: c evicts b (bytes 300 > 250)
    cache.get(c)
    assert cache.num_bytes == 200 and compiled == ["a", "b", "c"]
    cache.get(a)
    assert compiled == ["a", "b", "c"]
    cache.get(b)
    assert compiled == ["a", "b", "c", "b"]


def test_real_runner_keeps_outputs_valid_through_preemptions(gguf_path):
    """The packaged SmolLM2 with a KV cache too small for the batch: requests are preempted and
    recomputed, their matchers rebuilt by replay, and every output still completes and parses."""
    jsonschema = pytest.importorskip("jsonschema")
    from zeroserve.gpu_worker.model_runner import RunnerConfig
    from zeroserve.launcher.inprocess import InProcessEngine
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["name", "tags"],
    }
    tok = load_tokenizer(gguf_path)
    prompts = [
        tok.encode_chat(
            [{"role": "user", "content": f"Describe item number {i} as JSON with a name and tags."}]
        )
        for i in range(8)
    ]
    engine = InProcessEngine(RunnerConfig(model=gguf_path, num_kv_blocks=24, block_size=16, max_num_seqs=8))
    params = SamplingParams(
        max_tokens=80, temperature=0, structured=StructuredOutput("json", json.dumps(schema))
    )
    dead_ends = []
    outputs = engine.generate(prompts, params, on_step=lambda step: dead_ends.extend(step.result.dead_ends))
    assert engine.scheduler.num_preemptions > 0  # the point of the small cache
    assert dead_ends == []
    for ids in outputs:
        assert ids[-1] in engine.runner.eos_token_ids, tok.decode(ids)
        jsonschema.validate(json.loads(tok.decode(ids)), schema)
