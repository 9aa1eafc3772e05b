"""generate.py on its own: the token-text cache for logprob alternatives and EngineStreams'
guarantees (every stream closed, transport failures become error deltas)."""

from __future__ import annotations

import asyncio

from api_fake_engine import FakeEngineClient

from zeroserve.api_proc.generate import EngineStreams, TokenTexts
from zeroserve.shared.messages import GenerateRequest, SamplingParams, TokenizeResult


class SlowDetokenizer:
    def __init__(self, fail: bool = False):
        self.calls: list[list[int]] = []
        self.fail = fail

    async def detokenize(self, req):
        self.calls.append(list(req.token_ids))
        await asyncio.sleep(0.05)
        if self.fail:
            raise TimeoutError("no answer")
        return TokenizeResult(request_id=req.request_id, text=f"<{req.token_ids[0]}>")


async def test_concurrent_lookups_of_one_token_ask_the_engine_once():
    engine = SlowDetokenizer()
    texts = TokenTexts(engine)
    texts.learn([1], ["one"])
    a, b = await asyncio.gather(texts.lookup({1, 7, 8}), texts.lookup({7}))
    assert a == {1: "one", 7: "<7>", 8: "<8>"} and b == {7: "<7>"}
    assert sorted(engine.calls) == [[7], [8]]
    assert await texts.lookup({7}) == {7: "<7>"} and len(engine.calls) == 2  # cached


async def test_failed_lookup_is_empty_and_not_cached():
    engine = SlowDetokenizer(fail=True)
    texts = TokenTexts(engine)
    assert await texts.lookup({5}) == {5: ""}
    await texts.lookup({5})
    assert engine.calls == [[5], [5]]


def gen(request_id: str, prompt: str) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, params=SamplingParams(max_tokens=3), prompt=prompt)


async def test_streams_merge_choices_and_close_every_stream():
    fake = FakeEngineClient()
    async with EngineStreams(fake, [gen("r-0", "a"), gen("r-1", "RAISE")], None, 5.0) as streams:
        seen = [(i, d.text, d.finish_reason, d.error.status if d.error else None) async for i, d in streams]
    assert [s for s in seen if s[0] == 0] == [
        (0, " t0", None, None),
        (0, " t1", None, None),
        (0, " t2", "length", None),
    ]
    assert [s for s in seen if s[0] == 1] == [(1, "", "error", 503)]
    assert fake.active == 0


async def test_leaving_early_aborts_what_still_runs():
    fake = FakeEngineClient()
    async with EngineStreams(fake, [gen("r-0", "HANG"), gen("r-1", "HANG")], None, 5.0) as streams:
        async for _ in streams:
            break
    assert sorted(fake.aborted) == ["r-0", "r-1"] and fake.active == 0
