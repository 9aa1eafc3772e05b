"""Hypothesis stateful test: random add / step / abort / finish / failure sequences.

After every rule the scheduler's bookkeeping must be consistent (no block leaked or freed
twice, no ref count negative, block tables match ref counts), and the fake worker checks
every plan against its own state and KV contents. At the end every request runs to
completion (nothing starves) and every block is free, or cached with ref count 0.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sched_fakes import FakeWorker, context_token, make_request

from zeroserve.scheduler_proc.scheduler import AdmissionError, Scheduler, SchedulerConfig
from zeroserve.shared.messages import StepResult

# Passing takes seconds; a failure is shrunk for up to Hypothesis' 300 s shrink limit.
pytestmark = pytest.mark.timeout(400)

EOS = 2
NUM_BLOCKS, BLOCK_SIZE = 8, 4  # 32 slots: the largest request fills the pool
PREFIXES = [list(range(100, 112)), list(range(100, 106)) + [300] * 6, [400 + i for i in range(12)]]


REQUEST = st.tuples(
    st.integers(0, len(PREFIXES) - 1),  # which shared prefix
    st.integers(0, 12),  # how much of it
    st.lists(st.integers(500, 503), max_size=8),  # a tail after it
    st.integers(1, 12),  # max_tokens
    st.integers(0, 2),  # priority
    st.sampled_from([None, "t1"]),  # cache_salt
    st.sampled_from([None, None, None, 0.5, 3.0]),  # deadline, seconds from now
)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        budget=st.integers(2, 16),
        max_seqs=st.integers(1, 5),
        aging=st.sampled_from([None, 0.5]),
        caching=st.booleans(),
    )
    def setup(self, budget, max_seqs, aging, caching):
        self.cfg = SchedulerConfig(
            num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
            max_model_len=32, eos_token_ids=(EOS,), max_waiting_requests=8, priority_aging_s=aging,
            enable_prefix_caching=caching,
        )  # fmt: skip
        self.s = Scheduler(self.cfg)
        self.w = FakeWorker(NUM_BLOCKS, BLOCK_SIZE, self.next_token)
        self.force_eos: set[str] = set()
        self.ended: dict[str, str] = {}  # id -> finish reason, or "abort"
        self.added = 0
        self.now = 0.0

    def next_token(self, rid: str, context: list[int]) -> int:
        return EOS if rid in self.force_eos else context_token(rid, context)

    def live_ids(self) -> list[str]:
        return sorted(self.s._requests)

    def apply(self, deltas) -> None:
        for d in deltas:
            assert d.request_id not in self.ended, f"delta after the end of {d.request_id}"
            if d.finish_reason is not None:
                self.ended[d.request_id] = d.finish_reason

    # ------------------------------------------------------------------ rules

    @rule(specs=st.lists(REQUEST, min_size=1, max_size=4))
    def add(self, specs):
        for prefix, cut, tail, max_tokens, priority, salt, deadline in specs:
            prompt = PREFIXES[prefix][:cut] + tail or [7]
            rid = f"r{self.added}"
            self.added += 1
            req = make_request(rid, prompt, max_tokens=max_tokens, arrival=self.now, priority=priority,
                               cache_salt=salt, deadline=None if deadline is None else self.now + deadline)  # fmt: skip
            try:
                self.s.add_request(req)
            except AdmissionError as err:
                assert err.status in (400, 429)
                self.ended[rid] = "refused"

    @rule(n=st.integers(1, 4))
    def steps(self, n):
        for _ in range(n):
            self.step()

    def step(self):
        self.now += 0.25
        plan = self.s.schedule(self.now)
        self.apply(self.s.drain_outputs())
        if plan is None:
            assert not self.s.running, "running requests but nothing scheduled"
            return
        budget = sum(n.num_new_tokens for n in plan.new) + sum(r.num_new_tokens for r in plan.running)
        assert 0 < budget <= self.cfg.max_num_batched_tokens
        self.apply(self.s.update_from_output(self.w.step(plan)))
        stats = self.s.stats()  # events show in --hypothesis-show-statistics: what was exercised
        for name, happened in (("preemption", stats.num_preemptions), ("prefix hit", stats.prefix_cache_hits),
                               ("eviction", self.s.blocks.num_evictions),
                               ("timeout", "timeout" in self.ended.values())):  # fmt: skip
            if happened:
                event(name)

    @precondition(lambda self: self.s.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(self.live_ids()))
        assert self.s.abort(rid)
        self.ended[rid] = "abort"
        assert not self.s.abort(rid), "a second abort of the same id finds nothing"

    @precondition(lambda self: self.s.has_unfinished())
    @rule(data=st.data())
    def finish_with_eos(self, data):
        self.force_eos.add(data.draw(st.sampled_from(self.live_ids())))

    @precondition(lambda self: bool(self.s.running))
    @rule(data=st.data())
    def abort_while_in_flight(self, data):
        plan = self.s.schedule(self.now)
        self.apply(self.s.drain_outputs())
        ids = [n.request_id for n in plan.new] + [r.request_id for r in plan.running]
        rid = data.draw(st.sampled_from(ids))
        self.s.abort(rid)
        self.ended[rid] = "abort"
        self.apply(self.s.update_from_output(self.w.step(plan)))

    @precondition(lambda self: bool(self.s.running))
    @rule(restart=st.booleans())
    def failed_step(self, restart):
        plan = self.s.schedule(self.now)
        self.apply(self.s.drain_outputs())
        self.w.step(plan)  # the workers took the plan in, then the step failed
        deltas = self.s.update_from_output(StepResult(plan.step_id, [], [], error="boom"))
        assert deltas and all(d.finish_reason == "error" for d in deltas)
        self.apply(deltas)
        if restart:  # a new worker group: empty KV cache, no per-request state
            self.s.reset_kv_cache()
            self.w = FakeWorker(NUM_BLOCKS, BLOCK_SIZE, self.next_token)

    @invariant()
    def consistent(self):
        if hasattr(self, "s"):
            self.s.check_invariants()

    def teardown(self):
        if not hasattr(self, "s") or self.s._inflight is not None:
            return  # no setup, or a rule failed mid-step: that failure is the report
        for _ in range(2000):  # nothing starves: every request ends without outside help
            if not self.s.has_unfinished():
                break
            self.step()
        assert not self.s.has_unfinished(), f"requests starved: {self.live_ids()}"
        assert set(self.ended) == {f"r{i}" for i in range(self.added)}, (
            "a request ended without a final delta"
        )
        bm = self.s.blocks
        assert all(r == 0 for r in bm.ref_cnt) and bm.num_free_blocks == NUM_BLOCKS
        assert all(bm.block_key[b] is None or b in bm._cached_free for b in range(NUM_BLOCKS))
        bm.check_invariants([0] * NUM_BLOCKS)


SchedulerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no "explain": it traces, slowly
)
test_scheduler_state_machine = SchedulerMachine.TestCase
