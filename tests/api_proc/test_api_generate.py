"""generate.py on its own: EngineStreams' guarantees (every stream closed, transport failures
become error deltas)."""

from __future__ import annotations

from api_fake_engine import FakeEngineClient

from zeroserve.api_proc.generate import EngineStreams
from zeroserve.shared.messages import GenerateRequest, SamplingParams


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
