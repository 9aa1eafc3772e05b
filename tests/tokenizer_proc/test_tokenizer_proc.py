"""tokenizer_proc's event loop stays responsive: prompts are built on a worker thread, and an
Abort or a reused id that arrives meanwhile still takes effect. The real TokenizerProcess and
real sockets; the scheduler is a ROUTER this test plays (it answers pings with stats)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import zmq
import zmq.asyncio

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, receive, receive_routed
from zeroserve.shared.messages import (
    Abort,
    ApiInbox,
    ChatMessage,
    EngineRequest,
    GenerateRequest,
    Ping,
    Pong,
    SamplingParams,
    SchedulerInbox,
    SchedulerStats,
    TextDelta,
    TokenizeRequest,
    TokenizeResult,
)
from zeroserve.tokenizer_proc.proc import TokenizerProcess

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


HUGE = words(600_000)  # ~3.6 MB: seconds of tokenization


class Harness:
    """A TokenizerProcess between a client DEALER and a scheduler ROUTER played here."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine_requests: list[EngineRequest] = []
        self.aborts: list[str] = []
        self.replies: dict[str, list] = {}
        self.pong_gaps: list[float] = []
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> Harness:
        self.ctx = zmq.asyncio.Context()
        self.scheduler = self.ctx.socket(zmq.ROUTER)
        self.scheduler.bind(self.config.scheduler_address)
        self.proc = TokenizerProcess(self.config, 0)
        self.client = self.ctx.socket(zmq.DEALER)
        self.client.setsockopt(zmq.IDENTITY, b"client")
        self.client.connect(self.config.tokenizer_address(0))
        self.codec = Codec(ApiInbox, "test.client")
        self.tasks = [
            asyncio.ensure_future(self.proc.run()),
            asyncio.ensure_future(self._play_scheduler()),
            asyncio.ensure_future(self._read_replies()),
            asyncio.ensure_future(self._ping()),
        ]
        deadline = time.monotonic() + 10
        while not self.proc.engine_alive():
            assert time.monotonic() < deadline, "the tokenizer never saw the scheduler"
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.proc.close()
        for sock in (self.client, self.scheduler, self.proc.front):
            sock.close(0)
        self.ctx.term()
        self.proc.ctx.term()

    async def _play_scheduler(self) -> None:
        codec = Codec(SchedulerInbox, "test.scheduler")
        stats = codec.encode(SchedulerStats(workers_ready=True, max_model_len=self.config.max_model_len))
        while True:
            identity, msg = await receive_routed(self.scheduler, codec)
            match msg:
                case Ping():
                    await self.scheduler.send_multipart([identity, stats])
                case EngineRequest():
                    self.engine_requests.append(msg)
                    self.arrived.set()
                case Abort():
                    self.aborts.append(msg.request_id)

    async def _read_replies(self) -> None:
        while True:
            msg = await receive(self.client, self.codec)
            if isinstance(msg, Pong) and msg.request_id.startswith("hb-"):
                self.pong_gaps.append(time.monotonic() - float(msg.request_id[3:]))
            else:
                self.replies.setdefault(msg.request_id, []).append(msg)

    async def _ping(self) -> None:
        """Like EngineClient: a ping every 50 ms (it also keeps this owner alive)."""
        while True:
            self.send(Ping(sent_at=0.0, request_id=f"hb-{time.monotonic()}"))
            await asyncio.sleep(0.05)

    def send(self, msg) -> None:
        self.client.send(self.codec.encode(msg))

    async def wait_for(self, predicate, timeout: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    def sent(self) -> list[str]:
        return [r.request_id for r in self.engine_requests]


@pytest.fixture
def config(tmp_path, gguf_path) -> EngineConfig:
    return EngineConfig(
        model=gguf_path, served_model_name="m", run_dir=str(tmp_path), max_model_len=2048, vocab_size=49152
    )


def generate(request_id: str, prompt: str, **kw) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, params=SamplingParams(max_tokens=4, **kw), prompt=prompt)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def test_pings_are_answered_while_a_huge_prompt_is_tokenized(config):
    async def main():
        async with Harness(config) as h:
            h.pong_gaps.clear()
            started = time.monotonic()
            h.send(generate("huge", HUGE))
            await h.wait_for(lambda: h.sent() == ["huge"], what="the huge request at the scheduler")
            took = time.monotonic() - started
            await asyncio.sleep(0.2)
            return took, max(h.pong_gaps), len(h.engine_requests[0].prompt_token_ids)

    took, worst_gap, num_tokens = run(main())
    assert num_tokens > 500_000
    assert took > 1.0, "the prompt was too small to show anything"
    assert worst_gap < 0.5, f"a ping waited {worst_gap:.2f}s while the prompt was tokenized in {took:.1f}s"


def test_an_abort_while_the_prompt_is_built_means_it_never_reaches_the_scheduler(config):
    async def main():
        async with Harness(config) as h:
            h.send(generate("big", HUGE))
            h.send(Abort(request_id="big"))
            h.send(generate("after", "Hello"))
            await h.wait_for(lambda: "after" in h.sent(), what="the request sent after the abort")
            await asyncio.sleep(0.3)
            return h.sent(), h.aborts, h.replies.get("big"), h.proc.pending, list(h.proc.requests)

    sent, aborts, replies, pending, live = run(main())
    assert sent == ["after"] and aborts == [] and replies is None
    assert pending == {} and live == ["after"]


def test_an_abort_from_another_connection_does_not_cancel_a_pending_request(config):
    async def main():
        async with Harness(config) as h:
            other = h.ctx.socket(zmq.DEALER)
            other.setsockopt(zmq.IDENTITY, b"other")
            other.connect(config.tokenizer_address(0))
            h.send(generate("big", HUGE))
            await asyncio.sleep(0.1)
            other.send(h.codec.encode(Abort(request_id="big")))
            await h.wait_for(lambda: "big" in h.sent(), what="the request at the scheduler")
            other.close(0)
            return h.sent()

    assert run(main()) == ["big"]


def test_a_reused_id_while_the_first_is_being_built_is_refused(config):
    async def main():
        async with Harness(config) as h:
            h.send(generate("x", HUGE))
            h.send(generate("x", "Hello"))
            await h.wait_for(lambda: "x" in h.replies, what="the refusal of the second x")
            await h.wait_for(lambda: h.sent() == ["x"], what="the first x at the scheduler")
            return h.replies["x"], h.engine_requests[0]

    replies, first = run(main())
    assert len(replies) == 1 and isinstance(replies[0], TextDelta)
    assert replies[0].error.status == 400 and replies[0].error.message == "duplicate request id"
    assert len(first.prompt_token_ids) > 500_000  # the first one won


def test_requests_reach_the_scheduler_in_arrival_order(config):
    async def main():
        async with Harness(config) as h:
            order = ["big", "a", "b", "c"]
            h.send(generate("big", words(100_000)))
            for rid in order[1:]:
                h.send(generate(rid, f"short prompt {rid}"))
            await h.wait_for(lambda: len(h.sent()) == 4, what="four requests at the scheduler")
            return order, h.sent(), [r.arrival_time for r in h.engine_requests]

    order, sent, arrivals = run(main())
    assert sent == order and arrivals == sorted(arrivals)


def test_n_copies_of_a_prompt_are_tokenized_once(config):
    async def main():
        async with Harness(config) as h:
            encode = h.proc.tokenizer.encode
            calls = []

            def counting(text, *args, **kwargs):
                calls.append(len(text))
                return encode(text, *args, **kwargs)

            h.proc.tokenizer.encode = counting
            prompt = words(3000, seed=5)
            chat = [ChatMessage(role="user", content=words(200, seed=6))]
            for j in range(16):
                h.send(generate(f"p-{j}", prompt, seed=j))
                h.send(
                    GenerateRequest(request_id=f"c-{j}", params=SamplingParams(max_tokens=4), messages=chat)
                )
            await h.wait_for(lambda: len(h.sent()) == 32, what="32 requests at the scheduler")
            return calls, h.engine_requests

    calls, requests = run(main())
    assert len(calls) == 2, calls  # one prompt, one rendered chat
    by_kind = {}
    for r in requests:
        by_kind.setdefault(r.request_id[0], set()).add(tuple(r.prompt_token_ids))
    assert len(by_kind["p"]) == 1 and len(by_kind["c"]) == 1
    assert [r.params.seed for r in requests if r.request_id[0] == "p"] == list(range(16))


def test_a_top_k_past_the_vocabulary_is_turned_off(config):
    async def main():
        async with Harness(config) as h:
            h.send(generate("k-huge", "Hi", top_k=2**62))
            h.send(generate("k-vocab", "Hi", top_k=49152))
            h.send(generate("k-real", "Hi", top_k=49151))
            await h.wait_for(lambda: len(h.sent()) == 3, what="three requests")
            return {r.request_id: r.params.top_k for r in h.engine_requests}

    assert run(main()) == {"k-huge": 0, "k-vocab": 0, "k-real": 49151}


def test_tokenize_errors_do_not_echo_internal_exception_text(config, caplog):
    async def main():
        async with Harness(config) as h:

            def broken(*args, **kwargs):
                raise RuntimeError("internal detail /srv/secret/path")

            h.proc.tokenizer.apply_chat_template = broken
            h.send(TokenizeRequest(request_id="t1", messages=[ChatMessage(role="user", content="Hi")]))
            await h.wait_for(lambda: "t1" in h.replies, what="the tokenize answer")
            return h.replies["t1"][0]

    result = run(main())
    assert isinstance(result, TokenizeResult) and result.error is not None
    assert result.error.status == 400 and "secret" not in result.error.message
    assert "RuntimeError" not in result.error.message
    assert any("t1" in r.getMessage() and r.exc_info for r in caplog.records)  # logged, with the id
