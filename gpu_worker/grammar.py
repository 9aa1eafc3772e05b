"""Constrained decoding on the worker: one xgrammar GrammarMatcher per constrained request and,
each step, a token bitmask applied to the logits of the constrained rows before sampling.

The book exists only once a constrained request has arrived (and only on the rank that
samples): until then a step does no grammar work at all, and later an unconstrained row costs
a dict lookup, no mask. Lifecycle of one request's matcher::

    plan.new (params.structured)   compile (cached), quick and full, on two compile threads; the
                                   matcher is made on the mask thread, on the quick grammar (then
                                   rebuilt on the full one when ready), replaying the tokens
                                   generated before a preemption (token_ids after the prompt)
    step: prepare(sampling rows)   before the forward: queue the mask of every constrained row
                                   whose mask is not queued yet (new rows)
          mask(logits)             after the forward: wait for the mask thread (it ran during
                                   the forward), copy the rows' masks to the logits' device and
                                   set disallowed logits to -inf (unconstrained rows untouched)
          finish(sampled ids)      accept each row's token; queue the next step's masks now, so
                                   they are computed while the scheduler plans and the next
                                   forward runs
    plan.finished_ids, reset       matcher dropped

A row whose grammar allows no token (a dead end: a terminated matcher, a token it refused, a
grammar that did not compile) is reported in StepResult.dead_ends; the scheduler ends it
("stop", stop_reason "grammar_dead_end") and ignores the token sampled for it. A finished
grammar allows only the model's EOS ids, so a complete output ends as an ordinary EOS stop.

Threads: xgrammar releases the GIL while it compiles and fills masks. Two compile threads
(quick and full, see ``Compiled``: a step never waits for a full compile) and one mask thread
(FIFO: a mask job always sees the matcher state of the step it was queued after). Matchers
are touched by the main thread only after it waited for the mask thread.

Compiled grammars are cached by hash of (kind, spec), an LRU bounded in entries and in bytes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from zeroserve.kernels import KernelBackend, get_kernels
from zeroserve.shared.messages import StepPlan, StructuredOutput
from zeroserve.shared.structured_grammar import build_grammar, grammar_key

log = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 512
MAX_CACHED_BYTES = 512 * 2**20


def tokenizer_info(model_path: str, vocab_size: int, eos_token_ids: list[int]):
    """xgrammar's view of the model's vocabulary: each id's bytes, special tokens as empty
    strings (which xgrammar never lets into the text), ids past the tokenizer's vocabulary
    (a padded lm_head) masked, and the model's EOS ids as the stop tokens."""
    import xgrammar as xgr

    # the tokenizer loader (tokenizer.json or GGUF metadata) is a library here, not a process
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    n = min(tok.vocab_size, vocab_size)
    special = tok.special_token_ids
    pieces = [tok.id_to_token(i) or "" for i in range(n)]
    if tok.is_byte_level:
        vocab, kind = [b"" if i in special else tok.token_bytes(i) for i in range(n)], xgr.VocabType.RAW
    elif any(p.startswith("<0x") and len(p) == 6 for p in pieces):  # sentencepiece: ▁ and <0xNN>
        vocab, kind = ["" if i in special else p for i, p in enumerate(pieces)], xgr.VocabType.BYTE_FALLBACK
    else:
        vocab, kind = [b"" if i in special else tok.token_bytes(i) for i in range(n)], xgr.VocabType.RAW
    return xgr.TokenizerInfo(vocab, kind, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids))


@dataclass(eq=False)
class Compiled:
    """One constraint, compiled twice: ``quick`` with xgrammar's dynamic compilation (ready in
    milliseconds whatever the grammar; each parser state's mask is built the first time it is
    needed, on the mask thread) and ``full`` with every mask precomputed (up to a second for an
    unlucky regex or a wide schema; then each mask costs microseconds). A request starts on
    ``quick`` at once and moves to ``full`` when it is ready, so no step ever waits for a compile.
    """

    quick: Future  # CompiledGrammar
    full: Future  # CompiledGrammar

    def futures(self) -> tuple[Future, Future]:
        return self.quick, self.full


class GrammarCache:
    """Compiled grammars by hash of (kind, spec): futures, so concurrent requests for one schema
    share one compile. LRU, bounded in entries and in the compiled grammars' bytes."""

    def __init__(self, compile_fn, max_entries: int = MAX_CACHED_GRAMMARS, max_bytes: int = MAX_CACHED_BYTES):
        self.compile_fn = compile_fn  # StructuredOutput -> Compiled (or a Future, in tests)
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[bytes, Compiled | Future] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, so: StructuredOutput):
        key = grammar_key(so)
        fut = self._entries.get(key)
        if fut is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return fut
        self.misses += 1
        fut = self._entries[key] = self.compile_fn(so)
        self._evict()
        return fut

    @property
    def num_bytes(self) -> int:
        return sum(_size(f) for f in self._entries.values())

    def _evict(self) -> None:
        total = self.num_bytes
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or total > self.max_bytes):
            _, old = self._entries.popitem(last=False)  # a matcher holding it keeps it alive
            total -= _size(old)

    def clear(self) -> None:
        self._entries.clear()


def _size(entry: Compiled | Future) -> int:
    futures = entry.futures() if isinstance(entry, Compiled) else (entry,)
    # a dynamically compiled grammar grows as its masks are built: read when evicting
    return sum(f.result().memory_size_bytes for f in futures if f.done() and f.exception() is None)


@dataclass(eq=False)
class Row:
    """One constrained request."""

    request_id: str
    grammar: Compiled
    # every token the matcher has accepted or must accept: those generated before a preemption
    # at first, then each sampled one; replayed into a new matcher when ``full`` is ready
    tokens: list[int]
    slot: int  # its row in the bitmask buffer
    matcher: object | None = None
    final: bool = False  # the matcher is built on the full grammar (or no better one will come)
    queued: bool = False  # a mask for the matcher's current state is filled or queued
    dead: str | None = None  # why it can take no token (set on the mask thread, read after a wait)


class GrammarBook:
    """The worker's constrained requests (rank 0 only: the rank that samples)."""

    def __init__(
        self, make_info: Callable[[], object], vocab_size: int, kernels: KernelBackend | None = None
    ):
        """make_info: builds the xgrammar TokenizerInfo (``tokenizer_info``); called at once on
        a compile thread, so that a step with the first constrained request does not wait for
        the vocabulary to be read. vocab_size: the logits' width (the model's vocabulary).
        kernels: the runner's backend, whose ``apply_token_bitmask`` masks the logits (default:
        the one ``get_kernels()`` picks here)."""
        self.make_info, self.vocab_size = make_info, vocab_size
        self.kernels = kernels if kernels is not None else get_kernels()
        self.words = (vocab_size + 31) // 32
        self.rows: dict[str, Row] = {}
        # quick compiles never queue behind a full one (which may take a second)
        self._quick_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-quick")
        self._full_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-full")
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._compilers: Future = self._quick_pool.submit(self._make_compilers)  # vocabulary read once
        self.cache = GrammarCache(self._compile)
        self._buffer = torch.zeros((16, self.words), dtype=torch.int32)  # one mask per slot, on CPU
        self._free = list(range(15, -1, -1))
        self._last_job: Future | None = None
        # seconds the steps spent waiting for masks, applying them and accepting tokens (benchmarks)
        self.wait_s = self.apply_s = self.accept_s = 0.0
        self.fill_s = 0.0  # the mask thread's time (off the step's path unless waited for)

    # ------------------------------------------------------------------ compile thread

    def _make_compilers(self):
        import xgrammar as xgr

        info = self.make_info()
        # (quick, full); GrammarCache is the cache, so xgrammar's own is off
        return tuple(
            xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False, enable_dynamic_compilation=dynamic)
            for dynamic in (True, False)
        )

    def _compile(self, so: StructuredOutput) -> Compiled:
        def compile_with(which: int):
            return self._compilers.result()[which].compile_grammar(build_grammar(so))

        return Compiled(self._quick_pool.submit(compile_with, 0), self._full_pool.submit(compile_with, 1))

    # ------------------------------------------------------------------ requests in and out

    def sync(self, plan: StepPlan) -> None:
        """Apply the plan's diffs: forget finished (or preempted) requests, take new constrained ones."""
        for rid in plan.finished_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self._free.append(row.slot)
        for new in plan.new:
            so = new.params.structured
            if so is not None:
                prompt = len(new.token_ids) if new.num_prompt_tokens < 0 else new.num_prompt_tokens
                self.add(new.request_id, so, new.token_ids[prompt:])

    def add(self, request_id: str, so: StructuredOutput, generated: list[int] = ()) -> None:
        if not self._free:
            self._grow()
        self.rows[request_id] = Row(request_id, self.cache.get(so), list(generated), self._free.pop())

    def clear(self) -> None:
        """Forget every request (the worker's reset); compiled grammars stay cached."""
        self._wait()
        for row in self.rows.values():
            self._free.append(row.slot)
        self.rows.clear()

    def close(self) -> None:
        for pool in (self._mask_pool, self._quick_pool, self._full_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    def _grow(self) -> None:
        self._wait()  # the mask thread writes into the buffer
        old = self._buffer.shape[0]
        self._buffer = torch.cat([self._buffer, torch.zeros_like(self._buffer)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    # ------------------------------------------------------------------ one step

    def prepare(self, states) -> ConstrainedStep | None:
        """Before the forward: the constrained rows among the step's sampling rows (plan order),
        with their masks queued; None when there are none (nothing else to do this step)."""
        rows = self.rows
        if not rows:
            return None
        picked = [(i, row) for i, s in enumerate(states) if (row := rows.get(s.request_id)) is not None]
        if not picked:
            return None
        self._queue([row for _, row in picked if not row.queued])
        return ConstrainedStep(self, picked)

    def _queue(self, rows: list[Row]) -> None:
        if not rows:
            return
        for row in rows:
            row.queued = True
        self._last_job = self._mask_pool.submit(self._fill, rows, self._buffer)

    def _wait(self) -> None:
        if self._last_job is not None:
            self._last_job.result()  # _fill never raises: a row's failure is its dead end
            self._last_job = None

    def _fill(self, rows: list[Row], buffer: torch.Tensor) -> None:
        """On the mask thread: make missing matchers, then each row's next-token mask."""
        import xgrammar as xgr

        start = time.perf_counter()
        for row in rows:
            if row.dead is not None:
                continue
            try:
                if row.matcher is None or (not row.final and row.grammar.full.done()):
                    self._build_matcher(xgr, row)
                if row.dead is None and row.matcher.is_terminated():
                    row.dead = "the grammar has ended"
                if row.dead is None:
                    row.matcher.fill_next_token_bitmask(buffer, row.slot)
                    if not bool(buffer[row.slot].any()):
                        row.dead = "no token can continue the output"
            except Exception as e:  # a compile failure the tokenizer's check did not foresee
                log.error("request %s: constrained decoding failed: %s", row.request_id, e)
                row.dead = f"constrained decoding failed: {e}"
        self.fill_s += time.perf_counter() - start

    @staticmethod
    def _build_matcher(xgr, row: Row) -> None:
        """A matcher on the full grammar if it is compiled, else on the quick one, brought to
        the row's state by its tokens (a new row: those generated before a preemption)."""
        full = row.grammar.full
        if full.done() and full.exception() is None:
            compiled, row.final = full.result(), True
        else:
            compiled = row.grammar.quick.result()  # raises if the spec does not compile: a dead end
            row.final = full.done()  # the full compile failed: the quick grammar is as good as it gets
        matcher = xgr.GrammarMatcher(compiled)
        for token in row.tokens:
            if not matcher.accept_token(token):
                row.dead = f"a token generated earlier ({token}) does not match the grammar"
                return
        row.matcher = matcher
        if row.final:
            row.tokens = []  # no other matcher will need them


class ConstrainedStep:
    """The constrained rows of one step: mask the logits, then accept the sampled tokens."""

    def __init__(self, book: GrammarBook, picked: list[tuple[int, Row]]):
        self.book, self.picked = book, picked
        self.dead: list[str] = []

    def mask(self, logits: torch.Tensor) -> None:
        """Set every logit the grammar forbids to -inf, in place, on the constrained rows."""
        book = self.book
        start = time.perf_counter()
        book._wait()
        applied = time.perf_counter()
        book.wait_s += applied - start
        try:
            self._mask(logits)
        finally:
            book.apply_s += time.perf_counter() - applied

    def _mask(self, logits: torch.Tensor) -> None:
        book = self.book
        live = [(i, row) for i, row in self.picked if row.dead is None]
        self.dead = [row.request_id for _, row in self.picked if row.dead is not None]
        if not live:
            return
        slots = torch.tensor([row.slot for _, row in live], dtype=torch.int64)
        bits = book._buffer.index_select(0, slots).to(logits.device, non_blocking=True)
        rows = None  # every row constrained, in order
        if len(live) < logits.shape[0]:
            rows = torch.tensor([i for i, _ in live], dtype=torch.int64, device=logits.device)
        book.kernels.apply_token_bitmask(logits, bits, rows)
        width = book.words * 32
        if logits.shape[-1] > width:  # columns past the mask (a padded lm_head): never allowed
            logits[slice(None) if rows is None else rows, width:] = float("-inf")

    def finish(self, token_ids: list[int]) -> list[str]:
        """After sampling: advance each live row's matcher by its token; queue the next masks.
        Returns the request ids that hit a dead end this step (their token is void)."""
        start = time.perf_counter()
        dead = self.dead
        advanced = []
        for i, row in self.picked:
            if row.dead is not None:
                continue
            if not row.matcher.accept_token(token_ids[i]):
                row.dead = f"the grammar refused the sampled token {token_ids[i]}"
                dead.append(row.request_id)
                continue
            if not row.final:
                row.tokens.append(token_ids[i])
            row.queued = False
            advanced.append(row)
        self.book._queue(advanced)  # the next step's masks, computed while it is planned and run
        self.book.accept_s += time.perf_counter() - start
        return dead
