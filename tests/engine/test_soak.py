"""Soak (issue 13): many mixed requests, some abandoned midway, against one real engine kept
short of KV blocks, so that preemption, prefix-cache reuse, stop-string aborts and client
disconnects all interleave. At the end every KV block is free, no process restarted, and every
response that completed was well-formed.

A short run is in the default suite; the 2,000-request run is marked slow. Each request is
drawn from its own RNG (seed, index), so one failing request reproduces alone:
ZEROSERVE_SOAK_SEED=<printed seed> pytest tests/engine/test_soak.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.conftest import start_server
from tests.stack_health import assert_unharmed, engine_stats, error_body_problem, full_log, wait_engine_idle

# 20 blocks of 16 tokens: five sequences of ~60 tokens fill it, so eight running at once
# preempt; the longest valid request (a chat prompt + 32 tokens, ~7 blocks) still fits
KV_BLOCKS = 20
MAX_NUM_SEQS = 8
CONCURRENCY = 16
MAX_TOKENS = 32
HANG_S = 240.0  # a request that takes longer than this (queue included) counts as hung

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing near "
    "an old river bank under evening light"
).split()
SHARED_PREFIX = "You are a careful assistant. Answer briefly and never repeat yourself. "
# " " and "e" match almost at once; the others sometimes or never
STOPS = [" ", "e", "the", ".", "\n", "ing", "zzqx", "a b", "é"]
SPECIAL_TOKEN = re.compile(r"<\|?[a-z_]+\|?>")  # <|im_end|>, <jupyter_output>


@pytest.fixture(scope="module")
def server():
    server = start_server("--num-kv-blocks", str(KV_BLOCKS), "--max-num-seqs", str(MAX_NUM_SEQS))
    yield server
    assert server.stop() == 0, server.log()


# --------------------------------------------------------------------------- request drawing


@dataclass
class Case:
    index: int
    path: str
    body: dict
    valid: bool
    # None: read to the end; ("chunks", k): drop a stream after k events; ("timeout", s): give
    # up on the response after s seconds
    disconnect: tuple[str, float] | None = None

    @property
    def chat(self) -> bool:
        return self.path.endswith("chat/completions")

    @property
    def num_choices(self) -> int:
        prompts = self.body.get("prompt")
        num_prompts = len(prompts) if isinstance(prompts, list) and isinstance(prompts[0], str | list) else 1
        return self.body.get("n", 1) * (1 if self.chat else num_prompts)

    @property
    def wants_logprobs(self) -> bool:
        value = self.body.get("logprobs")  # completions: a count (0 is a request); chat: a flag
        return value is not None and value is not False

    @property
    def stops(self) -> list[str]:
        stop = self.body.get("stop")
        return [stop] if isinstance(stop, str) else list(stop or [])

    def short(self) -> str:
        return f"#{self.index} {self.path} {json.dumps(self.body)[:400]} disconnect={self.disconnect}"


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def text_prompt(rng: random.Random) -> str:
    # a shared prefix over a block long makes later requests hit the prefix cache
    return (SHARED_PREFIX if rng.random() < 0.4 else "") + words(rng, 1, 20)


def sampling(rng: random.Random) -> dict:
    body: dict = {"max_tokens": rng.randint(1, MAX_TOKENS)}
    if rng.random() < 0.3:
        body["temperature"] = 0.0
    elif rng.random() < 0.8:
        body["temperature"] = round(rng.uniform(0.0, 2.0), 3)
    optional = {
        "top_p": lambda: round(rng.uniform(0.01, 1.0), 3),
        "top_k": lambda: rng.choice([-1, 0, 1, 2, 5, 40, 1000]),
        "min_p": lambda: round(rng.uniform(0.0, 0.5), 3),
        "presence_penalty": lambda: round(rng.uniform(-2.0, 2.0), 3),
        "frequency_penalty": lambda: round(rng.uniform(-2.0, 2.0), 3),
        "repetition_penalty": lambda: round(rng.uniform(0.5, 2.0), 3),
        "seed": lambda: rng.randint(-(2**63), 2**63 - 1),
        "ignore_eos": lambda: rng.random() < 0.5,
        "include_stop_str_in_output": lambda: rng.random() < 0.5,
    }
    for name, value in optional.items():
        if rng.random() < 0.4:
            body[name] = value()
    if rng.random() < 0.5:
        stops = rng.sample(STOPS, rng.randint(1, 3))
        body["stop"] = stops[0] if len(stops) == 1 and rng.random() < 0.5 else stops
    if rng.random() < 0.2:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.75:
        body["n"] = rng.randint(1, 4)
    return body


# one wrong field each, the 4xx the API or the scheduler must answer instead of running it
INVALID = [
    {"temperature": 2.5},
    {"top_p": 0},
    {"n": 0},
    {"max_tokens": 0},
    {"min_tokens": 40, "max_tokens": 4},
    {"logprobs": 99},
    {"model": "no-such-model"},
    {"max_tokens": 3000},  # past the context
    {"max_tokens": 1000},  # fits the context, not the KV pool
    {"stop": ""},
    {"min_p": 1.5},
    {"presence_penalty": -3},
    {"top_k": -2},
    {"temperature": "warm"},
]


def draw_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}-{index}")
    chat = rng.random() < 0.5
    body = sampling(rng)
    if chat:
        path = "/v1/chat/completions"
        messages = [{"role": "user", "content": text_prompt(rng)}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": SHARED_PREFIX})
        body["messages"] = messages
        if rng.random() < 0.25:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 5)
    else:
        path = "/v1/completions"
        shape = rng.random()
        if shape < 0.6:
            body["prompt"] = text_prompt(rng)
        elif shape < 0.8:
            body["prompt"] = [text_prompt(rng) for _ in range(2)]
        else:
            body["prompt"] = [rng.randint(100, 20000) for _ in range(rng.randint(1, 24))]
        if rng.random() < 0.25:
            body["logprobs"] = rng.randint(0, 5)
        elif rng.random() < 0.15:
            body["echo"] = True
    body["stream"] = rng.random() < 0.5
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    valid = rng.random() >= 0.08
    if not valid:
        bad = dict(rng.choice(INVALID))
        if chat and "logprobs" in bad:
            bad = {"top_logprobs": 99, "logprobs": True}
        body.update(bad)
    disconnect = None
    if rng.random() < 0.2:
        if body["stream"]:
            disconnect = ("chunks", rng.randint(0, 6))
        else:
            disconnect = ("timeout", round(rng.uniform(0.05, 2.0), 2))
    return Case(index, path, body, valid, disconnect)


# --------------------------------------------------------------------------- well-formedness


def check_usage(case: Case, usage: dict, choices: list[dict]) -> list[str]:
    problems = []
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return [f"usage is not integers: {usage}"]
    if usage.get("total_tokens") != prompt + completion:
        problems.append(f"usage total is not prompt + completion: {usage}")
    if prompt <= 0:
        problems.append(f"no prompt tokens counted: {usage}")
    max_tokens = case.body["max_tokens"]
    # every choice produced at least one token; a "length" one exactly max_tokens
    num_length = sum(c.get("finish_reason") == "length" for c in choices)
    lo = num_length * max_tokens + (len(choices) - num_length)
    hi = len(choices) * max_tokens
    if not lo <= completion <= hi:
        problems.append(f"completion_tokens {completion} outside [{lo}, {hi}] for {len(choices)} choices")
    return problems


def check_choice_text(case: Case, text: str, finish: str | None, stop_reason) -> list[str]:
    """What a finished choice's text must satisfy given the request's stop strings."""
    problems = []
    if finish not in ("stop", "length"):
        return [f"finish_reason {finish!r}"]
    stops = case.stops
    if finish == "stop" and case.body.get("ignore_eos") and not stops:
        problems.append("finish_reason stop with ignore_eos and no stop strings")
    if stops and not case.body.get("echo"):
        body = text
        if case.body.get("include_stop_str_in_output") and finish == "stop" and isinstance(stop_reason, str):
            if not text.endswith(stop_reason):
                problems.append(f"stop string {stop_reason!r} not at the end of {text!r}")
            body = text[: len(text) - len(stop_reason)]
        leaked = [s for s in stops if s in body]
        if leaked:
            problems.append(f"text {text!r} holds stop strings {leaked}")
    if finish == "stop" and isinstance(stop_reason, str) and stop_reason not in stops:
        problems.append(f"stop_reason {stop_reason!r} is not one of the stop strings {stops}")
    return problems


def spells(tokens: list[str], text: str) -> bool:
    """Whether the logprob tokens, in order, make up the text. A special token (EOS,
    <jupyter_output>) has a logprob but no text under skip_special_tokens, and a token holding
    part of a UTF-8 character shows as U+FFFD on its own: those cannot be checked."""
    if any("\ufffd" in t for t in tokens):
        return True
    at = 0
    for t in tokens:
        if text.startswith(t, at):
            at += len(t)
        elif not SPECIAL_TOKEN.fullmatch(t):
            return False
    return at == len(text)


def check_logprobs(case: Case, lp, text: str, finish: str | None) -> list[str]:
    if lp is None:
        return ["logprobs missing"]
    if case.chat:
        entries = lp.get("content")
        if not isinstance(entries, list):
            return [f"chat logprobs without content: {lp}"]
        want_top = case.body.get("top_logprobs") or 0
        if any(e["logprob"] > 1e-4 or len(e["top_logprobs"]) != want_top for e in entries):
            return [f"chat logprob entries malformed (want {want_top} alternatives): {entries[:3]}"]
        tokens = [e["token"] for e in entries]
    else:
        tokens = lp.get("tokens")
        if not (
            len(tokens) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        ):
            return [f"completion logprobs of different lengths: {lp}"]
        if any(x > 1e-4 for x in lp["token_logprobs"]):
            return [f"a positive logprob: {lp['token_logprobs']}"]
    if not case.stops and not spells(tokens, text):
        return [f"logprob tokens {tokens} do not spell the text {text!r}"]
    if not case.stops and finish == "length" and len(tokens) != case.body["max_tokens"]:
        return [f"{len(tokens)} logprob entries for a length finish of {case.body['max_tokens']} tokens"]
    return []


def check_whole(case: Case, body: dict) -> list[str]:
    want_object = "chat.completion" if case.chat else "text_completion"
    if body.get("object") != want_object:
        return [f"object {body.get('object')!r}, want {want_object}"]
    choices = body.get("choices")
    if not isinstance(choices, list) or [c.get("index") for c in choices] != list(range(case.num_choices)):
        return [f"choice indexes {[c.get('index') for c in choices or []]}, want {case.num_choices} choices"]
    problems = check_usage(case, body.get("usage") or {}, choices)
    for c in choices:
        if case.chat:
            msg = c.get("message") or {}
            if msg.get("role") != "assistant" or not isinstance(msg.get("content"), str):
                problems.append(f"choice {c['index']}: message {msg}")
                continue
            text = msg["content"]
        else:
            text = c.get("text")
            if not isinstance(text, str):
                problems.append(f"choice {c['index']}: text {text!r}")
                continue
            if case.body.get("echo") and isinstance(case.body["prompt"], str):
                if not text.startswith(case.body["prompt"]):
                    problems.append(f"choice {c['index']}: echo does not start with the prompt: {text!r}")
        problems += [
            f"choice {c['index']}: {p}"
            for p in check_choice_text(case, text, c["finish_reason"], c.get("stop_reason"))
        ]
        if case.wants_logprobs:
            problems += [
                f"choice {c['index']}: {p}"
                for p in check_logprobs(case, c.get("logprobs"), text, c["finish_reason"])
            ]
        elif c.get("logprobs") is not None:
            problems.append(f"choice {c['index']}: logprobs without asking")
    return problems


@dataclass
class StreamState:
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, tuple[str | None, object]] = field(default_factory=dict)
    lp: dict[int, list] = field(default_factory=dict)
    usage: dict | None = None
    done: bool = False


def take_event(case: Case, state: StreamState, data: bytes) -> list[str]:
    """One SSE data payload into ``state``; returns what is wrong with it."""
    if state.done:
        return [f"data after [DONE]: {data[:200]!r}"]
    if data == b"[DONE]":
        state.done = True
        return []
    try:
        chunk = json.loads(data)
    except ValueError:
        return [f"chunk is not JSON: {data[:200]!r}"]
    if "error" in chunk:
        return [f"error event mid-stream: {chunk['error']}"]
    want_object = "chat.completion.chunk" if case.chat else "text_completion"
    if chunk.get("object") != want_object:
        return [f"chunk object {chunk.get('object')!r}, want {want_object}"]
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return [f"chunk without choices: {chunk}"]
    if not choices:
        if chunk.get("usage") is None or state.usage is not None:
            return [f"a chunk with no choices that is not the one usage chunk: {chunk}"]
        state.usage = chunk["usage"]
        return []
    if state.usage is not None:
        return ["a choice chunk after the usage chunk"]
    problems = []
    for c in choices:
        i = c.get("index")
        if not isinstance(i, int) or not 0 <= i < case.num_choices:
            problems.append(f"chunk choice index {i!r} outside {case.num_choices} choices")
            continue
        if i in state.finish:
            problems.append(f"choice {i}: a chunk after its finish_reason")
        if case.chat:
            delta = c.get("delta")
            if not isinstance(delta, dict):
                problems.append(f"choice {i}: delta {delta!r}")
                continue
            piece = delta.get("content") or ""
            if delta.get("role") not in (None, "assistant"):
                problems.append(f"choice {i}: role {delta.get('role')!r}")
        else:
            piece = c.get("text")
        if not isinstance(piece, str):
            problems.append(f"choice {i}: text piece {piece!r}")
            continue
        state.texts.setdefault(i, []).append(piece)
        if c.get("logprobs") is not None:
            state.lp.setdefault(i, []).append(c["logprobs"])
        if c.get("finish_reason") is not None:
            state.finish[i] = (c["finish_reason"], c.get("stop_reason"))
    return problems


def merged_logprobs(case: Case, parts: list[dict]) -> dict:
    if case.chat:
        return {"content": [e for p in parts for e in p["content"]]}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [x for p in parts for x in p[k]] for k in keys}


def check_stream_end(case: Case, state: StreamState) -> list[str]:
    problems = []
    if not state.done:
        problems.append("the stream did not end with data: [DONE]")
    if sorted(state.finish) != list(range(case.num_choices)):
        problems.append(f"finish_reason for choices {sorted(state.finish)}, want {case.num_choices}")
    wants_usage = bool(case.body.get("stream_options", {}).get("include_usage"))
    if wants_usage != (state.usage is not None):
        problems.append(f"usage chunk {'missing' if wants_usage else 'not asked for'}")
    for i, (finish, stop_reason) in sorted(state.finish.items()):
        text = "".join(state.texts.get(i, []))
        problems += [f"choice {i}: {p}" for p in check_choice_text(case, text, finish, stop_reason)]
        if case.wants_logprobs:
            lp = merged_logprobs(case, state.lp.get(i, []))
            problems += [f"choice {i}: {p}" for p in check_logprobs(case, lp, text, finish)]
    if state.usage is not None:
        choices = [{"finish_reason": f} for f, _ in state.finish.values()]
        problems += check_usage(case, state.usage, choices)
    return problems


# --------------------------------------------------------------------------- driving


@dataclass
class Tally:
    ok: int = 0
    rejected: int = 0  # 4xx as expected
    dropped: int = 0  # the client left on purpose
    problems: list[str] = field(default_factory=list)

    def fail(self, case: Case, what: str | list[str]) -> None:
        for w in [what] if isinstance(what, str) else what:
            self.problems.append(f"{case.short()}: {w}")


async def run_stream(case: Case, resp: aiohttp.ClientResponse, tally: Tally) -> None:
    state, events, buffer = StreamState(), 0, b""
    limit = case.disconnect[1] if case.disconnect else None
    if limit == 0:
        resp.close()  # gone as soon as the headers came
        tally.dropped += 1
        return
    async for line in resp.content:
        buffer += line
        if not buffer.endswith(b"\n"):
            continue  # a line longer than the reader's chunk
        line, buffer = buffer.strip(), b""
        if not line:
            continue
        if not line.startswith(b"data: "):
            tally.fail(case, f"stream line is not an SSE data line: {line[:200]!r}")
            return
        problems = take_event(case, state, line[len(b"data: ") :])
        if problems:
            tally.fail(case, problems)
            return
        events += 1
        if limit is not None and events >= limit:
            resp.close()  # drop the connection mid-stream
            tally.dropped += 1
            return
    problems = check_stream_end(case, state)
    if problems:
        tally.fail(case, problems)
    else:
        tally.ok += 1


async def run_case(session: aiohttp.ClientSession, server, case: Case, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    timeout = HANG_S
    if case.disconnect and case.disconnect[0] == "timeout":
        timeout = case.disconnect[1]
    try:
        async with asyncio.timeout(timeout):
            async with session.post(server.base_url + case.path, json=case.body, headers=headers) as resp:
                if not case.valid:
                    raw = await resp.read()
                    if not 400 <= resp.status < 500:
                        tally.fail(case, f"status {resp.status} for an invalid request: {raw[:300]!r}")
                    elif problem := error_body_problem(raw):
                        tally.fail(case, problem)
                    else:
                        tally.rejected += 1
                    return
                if resp.status != 200:
                    tally.fail(case, f"status {resp.status}: {(await resp.read())[:300]!r}")
                    return
                if case.body["stream"]:
                    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                        tally.fail(case, f"stream with Content-Type {resp.headers.get('Content-Type')}")
                        return
                    await run_stream(case, resp, tally)
                    return
                raw = await resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    tally.fail(case, f"body is not JSON: {raw[:300]!r}")
                    return
                problems = check_whole(case, body)
                if problems:
                    tally.fail(case, problems)
                else:
                    tally.ok += 1
    except TimeoutError:
        if case.disconnect and case.disconnect[0] == "timeout":
            tally.dropped += 1
        else:
            tally.fail(case, f"no complete answer within {HANG_S:.0f}s")
    except aiohttp.ClientError as e:
        tally.fail(case, f"connection failed: {type(e).__name__}: {e}")


async def soak(server, seed: int, num_requests: int) -> Tally:
    tally = Tally()
    cases = iter(draw_case(seed, i) for i in range(num_requests))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def lane() -> None:
            for case in cases:  # one shared iterator: CONCURRENCY requests in flight
                await run_case(session, server, case, tally)

        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return tally


@pytest.mark.parametrize(
    "num_requests",
    [
        pytest.param(160, id="short"),
        pytest.param(2000, id="2000", marks=[pytest.mark.slow, pytest.mark.timeout(7200)]),
    ],
)
def test_soak_leaves_every_block_free_and_every_process_alive(server, num_requests):
    seed = int(os.environ.get("ZEROSERVE_SOAK_SEED") or random.randrange(2**32))
    print(f"soak seed {seed} ({num_requests} requests); rerun with ZEROSERVE_SOAK_SEED={seed}")
    pids = server.children()
    log_offset = len(full_log(server))
    preemptions_before = engine_stats(server).num_preemptions

    started = time.monotonic()
    tally = asyncio.run(soak(server, seed, num_requests))
    took = time.monotonic() - started
    stats = wait_engine_idle(server)
    print(
        f"soak seed {seed}: {num_requests} requests in {took:.1f}s: {tally.ok} ok, {tally.rejected} "
        f"rejected, {tally.dropped} dropped, {len(tally.problems)} problems; "
        f"{stats.num_preemptions - preemptions_before} preemptions, {stats.num_steps} steps"
    )

    assert not tally.problems, f"seed {seed}: {len(tally.problems)} bad responses:\n" + "\n".join(
        tally.problems[:30]
    )
    assert_unharmed(server, pids, log_offset)
    assert tally.ok + tally.rejected + tally.dropped == num_requests
    # the run must have put the pool under pressure, or it proved nothing about leaks
    assert stats.num_preemptions > preemptions_before, f"seed {seed}: no preemption happened: {stats}"
    assert tally.ok > num_requests // 2 and tally.rejected > 0 and tally.dropped > 0, tally
